//! Where an image goes and what it is made of: path safety (the input is protected, an existing
//! image needs `overwrite`, parents must be groups of the same zarr format), and the zarr nodes
//! (parent groups, one array per level, the image group with its OME-NGFF multiscales), all
//! created through zarrs' metadata types and stored through the writer's atomic store.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use zarrs::array::codec::ZstdCodec;
use zarrs::array::{Array, ArrayBuilder, ArrayMetadata, ArrayMetadataOptions, CodecTraits, FillValue};
use zarrs::group::{Group, GroupMetadata};
use zarrs::metadata::v2::{ArrayMetadataV2, DataTypeMetadataV2, GroupMetadataV2, MetadataV2};
use zarrs::metadata::v3::GroupMetadataV3;
use zarrs::plugin::{ExtensionName, ZarrVersion};

use super::accumulate::Sample;
use super::config::WriterConfig;
use super::store::OutputStore;
use super::LevelInfo;
use crate::error::{Error, Result};
use crate::format::ngff::{AxisJson, ImageAttributesJson, LevelJson, MultiscaleJson, OmeJson, TransformJson, ZarrFormat};
use crate::format::zarr_node::read_multiscale;
use crate::geometry::AXES;
use crate::io::atomic::temporary_sibling;
use crate::io::location::Location;
use crate::io::store::Store;
use crate::with_dtype;

/// A local location as an absolute, lexically normalised path, with the longest existing prefix
/// canonicalised (symlinks resolved); a URL as it is.
fn resolved(location: &Location) -> Location {
    match location {
        Location::Remote(_) => location.clone(),
        Location::Local(path) => Location::Local(resolved_path(path)),
    }
}

fn resolved_path(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut clean = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    let mut existing = clean.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match existing.file_name() {
            Some(name) => {
                rest.push(name.to_os_string());
                existing.pop();
            }
            None => break,
        }
    }
    let mut out = fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.iter().rev() {
        out.push(name);
    }
    out
}

/// Whether a zarr node (group or array metadata) is at `location`: one round trip for a URL.
fn is_zarr_node(location: &Location) -> Result<bool> {
    match location {
        Location::Remote(url) => Ok(crate::io::remote::nodes_exist(std::slice::from_ref(url))?[0]),
        Location::Local(dir) => Ok(is_local_zarr_node(dir)),
    }
}

fn is_local_zarr_node(dir: &Path) -> bool {
    ZARR_METADATA_FILES.iter().any(|f| dir.join(f).is_file())
}

/// Whether `dir` holds only what an interrupted image creation, or one under way in another
/// process, leaves: folders, zarr nodes, zarr metadata files (one may be renamed into place
/// between a caller's own check for them and this listing) and hidden `.partial` temporaries;
/// no file of the user's.
fn is_interrupted_creation(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return false };
    entries.flatten().all(|entry| {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            is_local_zarr_node(&path) || is_interrupted_creation(&path)
        } else {
            ZARR_METADATA_FILES.contains(&name.as_str()) || (name.starts_with('.') && name.ends_with(".partial"))
        }
    })
}

/// The files that make a folder a zarr node (v2 and v3).
const ZARR_METADATA_FILES: [&str; 4] = [".zgroup", ".zarray", ".zattrs", "zarr.json"];

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false)
}

/// The locations from the `.zarr` container root (if the image is inside one) down to the
/// parent of `image`.
fn container_chain(image: &Location) -> Vec<Location> {
    let mut ancestors = Vec::new();
    let mut next = image.parent();
    while let Some(location) = next {
        next = location.parent();
        ancestors.push(location);
    }
    let root = ancestors
        .iter()
        .position(|l| l.name().is_some_and(|n| n.to_ascii_lowercase().ends_with(".zarr")));
    match root {
        Some(i) => ancestors[..=i].iter().rev().cloned().collect(),
        None => Vec::new(),
    }
}

fn multiscale_name(config: &WriterConfig) -> String {
    if let Some(n) = &config.name {
        return n.clone();
    }
    match container_chain(&config.path).first() {
        Some(root) => config.path.relative_to(root).unwrap_or_default(),
        None => config.path.name().unwrap_or_default().to_string(),
    }
}

fn exists_error(path: impl AsRef<Path>, kind: std::io::ErrorKind, message: &str) -> Error {
    Error::io(path, std::io::Error::new(kind, message.to_string()))
}

/// Checks that `config` can be written — values, the input it must not touch, an existing
/// image (an error unless `overwrite`), conflicting parent nodes, write permission — without
/// creating anything.
pub(super) fn validate(config: &WriterConfig) -> Result<()> {
    config.check_values()?;
    let path = resolved(&config.path);
    for p in &config.protected {
        let p = resolved(p);
        if path.starts_with(&p) || p.starts_with(&path) {
            return Err(Error::invalid(format!(
                "output {} would write into the input data at {p}; choose another target path",
                config.path
            )));
        }
    }
    let already = "output already exists (pass overwrite=True to replace it, or exist_ok=True to write into it)";
    let chain = container_chain(&path);
    let path = match path {
        Location::Remote(_) => {
            // An object store has no folders to probe: the image exists when its metadata does
            // (one round trip); writing is checked by the first write.
            if is_zarr_node(&path)? && !config.overwrite && !config.exist_ok {
                return Err(exists_error(&config.path, std::io::ErrorKind::AlreadyExists, already));
            }
            return Ok(());
        }
        Location::Local(path) => path,
    };
    if path.exists() {
        if !path.is_dir() {
            return Err(exists_error(
                &config.path,
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ));
        }
        if !is_empty_dir(&path) {
            if !config.overwrite && !config.exist_ok {
                return Err(exists_error(&config.path, std::io::ErrorKind::AlreadyExists, already));
            }
            if !is_local_zarr_node(&path) && !is_interrupted_creation(&path) {
                return Err(Error::invalid(format!(
                    "{}: exists and is not a zarr group; refusing to delete it for overwrite=True or to write into it",
                    config.path
                )));
            }
        }
    }
    for dir in chain.iter().filter_map(|l| l.local()) {
        if dir.join(".zarray").is_file() || crate::format::zarr_node::is_v3_array(dir) == Some(true) {
            return Err(Error::invalid(format!(
                "{}: is a zarr array, not a group; cannot write inside it",
                dir.display()
            )));
        }
        let (other, have, want) = match config.format {
            ZarrFormat::V2 => (dir.join("zarr.json"), 3, 2),
            ZarrFormat::V3 => (dir.join(".zgroup"), 2, 3),
        };
        if other.is_file() {
            return Err(Error::invalid(format!(
                "{}: is a zarr v{have} group but zarr_format={want} was requested",
                dir.display()
            )));
        }
    }
    // Write permission: probe the nearest existing ancestor.
    let mut existing = path.clone();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if !existing.is_dir() {
        return Err(exists_error(
            &existing,
            std::io::ErrorKind::NotADirectory,
            "is not a directory; cannot create the output below it",
        ));
    }
    let probe = temporary_sibling(&existing.join("cellmap-write-probe"), "probe");
    match fs::File::create(&probe) {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::io(
            format!("{}: cannot create the output {} here", existing.display(), config.path),
            e,
        )),
    }
}

/// The zarrs node path of `dir` in a store rooted at `root`.
fn node_path(root: &Location, dir: &Location) -> String {
    format!("/{}", dir.relative_to(root).unwrap_or_default())
}

fn store_group(
    store: &Arc<OutputStore>,
    node: &str,
    format: ZarrFormat,
    attributes: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let metadata = match format {
        ZarrFormat::V2 => GroupMetadata::V2(GroupMetadataV2::new().with_attributes(attributes)),
        ZarrFormat::V3 => GroupMetadata::V3(GroupMetadataV3::new().with_attributes(attributes)),
    };
    let where_ = || store.root().join(node.trim_start_matches('/'));
    let group = Group::new_with_metadata(store.clone(), node, metadata).map_err(|e| Error::metadata(where_(), e))?;
    group.store_metadata().map_err(|e| Error::metadata(where_(), e))
}

/// Creates the array of one level (its metadata stored) and returns it open for chunk writes.
fn create_array(config: &WriterConfig, store: &Arc<OutputStore>, node: &str, shape: [u64; 3]) -> Result<Array<OutputStore>> {
    let where_ = || store.root().join(node.trim_start_matches('/'));
    let chunks: Vec<u64> = config.chunk_shape.iter().map(|&c| c as u64).collect();
    let zstd = Arc::new(ZstdCodec::new(config.compression_level, false));
    let fill: FillValue = with_dtype!(config.dtype, T => FillValue::from(<T as Sample>::from_f64(config.fill_value)));
    let mut builder = ArrayBuilder::new(shape.to_vec(), chunks.clone(), config.dtype.zarrs(), fill);
    builder.bytes_to_bytes_codecs(vec![zstd.clone()]).dimension_names(Some(AXES));
    let array = match config.format {
        ZarrFormat::V3 => builder.build(store.clone(), node).map_err(|e| Error::metadata(where_(), e))?,
        ZarrFormat::V2 => {
            // zarrs builds v3 metadata only: the v2 form takes the same typed fill value and the
            // zstd codec's own v2 configuration.
            let v3 = builder.build_metadata().map_err(|e| Error::metadata(where_(), e))?;
            let mut compressor =
                serde_json::to_value(zstd.configuration(ZarrVersion::V2, &Default::default())).map_err(|e| Error::metadata(where_(), e))?;
            compressor["id"] = zstd.name(ZarrVersion::V2).unwrap_or("zstd".into()).into();
            let compressor: MetadataV2 = serde_json::from_value(compressor).map_err(|e| Error::metadata(where_(), e))?;
            let chunk_shape = chunks.iter().filter_map(|&c| std::num::NonZeroU64::new(c)).collect();
            let metadata = ArrayMetadataV2::new(
                shape.to_vec(),
                chunk_shape,
                DataTypeMetadataV2::Simple(config.dtype.v2_name().into()),
                v3.fill_value,
                Some(compressor),
                None,
            );
            Array::new_with_metadata(store.clone(), node, ArrayMetadata::V2(metadata)).map_err(|e| Error::metadata(where_(), e))?
        }
    };
    array
        .store_metadata_opt(&ArrayMetadataOptions::default().with_include_zarrs_metadata(false))
        .map_err(|e| Error::metadata(where_(), e))?;
    Ok(array)
}

/// The multiscale description: per level its path, voxel size and translation.
fn multiscale(config: &WriterConfig, levels: &[LevelInfo]) -> MultiscaleJson {
    MultiscaleJson {
        version: (config.format == ZarrFormat::V2).then(|| "0.4".to_string()),
        name: Some(multiscale_name(config)),
        axes: Some(
            AXES.iter()
                .map(|a| AxisJson::Described {
                    name: a.to_string(),
                    kind: Some("space".into()),
                    unit: Some("nanometer".into()),
                })
                .collect(),
        ),
        datasets: levels
            .iter()
            .map(|l| LevelJson {
                path: l.name.clone(),
                coordinate_transformations: vec![
                    TransformJson::Scale {
                        scale: l.voxel_size.to_vec(),
                    },
                    TransformJson::Translation {
                        translation: l.translation.to_vec(),
                    },
                ],
            })
            .collect(),
        coordinate_transformations: vec![TransformJson::Scale { scale: vec![1.0; 3] }],
    }
}

/// An image opened or created for writing: its store, its levels, and the key of its node in
/// the store (`""` when the store is rooted at the image).
pub(super) type OpenedImage = (Arc<OutputStore>, Vec<LevelInfo>, String);

fn image_key(root: &Location, image: &Location) -> String {
    node_path(root, image).trim_start_matches('/').to_string()
}

/// Where an image's nodes go: its resolved location, the locations from the `.zarr` container
/// root down to its parent, and the store rooted at that container (or at the image).
fn placement(config: &WriterConfig) -> Result<(Location, Vec<Location>, Location, Arc<OutputStore>)> {
    let image = resolved(&config.path);
    let chain = container_chain(&image);
    let root = chain.first().cloned().unwrap_or_else(|| image.clone());
    let store = Arc::new(OutputStore::new(&root, config.fsync)?);
    Ok((image, chain, root, store))
}

/// Opens the existing image `stored` for writing into it (`exist_ok`): its levels must have
/// the layout this writer would create (shape, chunks, data type, voxel size, translation).
fn open_image(config: &WriterConfig, stored: crate::format::ngff::Multiscale, levels: Vec<LevelInfo<()>>) -> Result<OpenedImage> {
    let (image, _, root, store) = placement(config)?;
    let mismatch = |what: String| {
        Error::invalid(format!(
            "{}: exists with {what}; exist_ok=True writes only into an image of the same layout (pass overwrite=True to replace it)",
            config.path
        ))
    };
    let mut opened = Vec::with_capacity(levels.len());
    for level in levels {
        let meta = stored
            .levels
            .iter()
            .find(|l| l.path.trim_matches('/') == level.name)
            .ok_or_else(|| mismatch(format!("no level '{}'", level.name)))?;
        let close = |a: &[f64], b: &[f64; 3]| a.len() == 3 && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-9 * y.abs().max(1.0));
        if !close(&meta.scale, &level.voxel_size) || !close(&meta.translation, &level.translation) {
            return Err(mismatch(format!(
                "level '{}' at voxel size {:?} and translation {:?}, not {:?} and {:?}",
                level.name, meta.scale, meta.translation, level.voxel_size, level.translation
            )));
        }
        let node = node_path(&root, &image.join(&level.name));
        let where_ = || image.join(&level.name);
        let array = Array::open(store.clone(), &node).map_err(|e| Error::metadata(where_(), e))?;
        let chunk: Vec<u64> = array
            .chunk_shape(&[0, 0, 0])
            .map_err(|e| Error::metadata(where_(), e))?
            .iter()
            .map(|c| c.get())
            .collect();
        let want_chunk: Vec<u64> = config.chunk_shape.iter().map(|&c| c as u64).collect();
        if array.shape() != level.shape || chunk != want_chunk || *array.data_type() != config.dtype.zarrs() {
            return Err(mismatch(format!(
                "level '{}' of shape {:?}, chunks {chunk:?} and data type {}, not {:?}, {want_chunk:?} and {}",
                level.name,
                array.shape(),
                array.data_type(),
                level.shape,
                config.dtype.name()
            )));
        }
        opened.push(level.with_array(array));
    }
    let key = image_key(&root, &image);
    Ok((store, opened, key))
}

/// Removes the image at `config.path` if there is one, checked as `overwrite` checks it (a zarr
/// group that is not the protected input); returns whether there was one. How several ranks
/// start a job over an old output: one rank clears it, then every rank writes into it.
pub(super) fn clear_image(config: &WriterConfig) -> Result<bool> {
    let mut check = config.clone();
    check.overwrite = true;
    check.exist_ok = false;
    check.shard = None;
    validate(&check)?;
    let exists = match resolved(&config.path) {
        remote @ Location::Remote(_) => is_zarr_node(&remote)?,
        Location::Local(path) => path.exists() && !is_empty_dir(&path),
    };
    if exists {
        let (image, _, root, store) = placement(config)?;
        store.erase_below(&node_path(&root, &image))?;
    }
    Ok(exists)
}

/// Creates the image: parent groups from the `.zarr` container down (those lacking metadata),
/// one array per level, then the image group's metadata last (a half-created image has no
/// multiscales). Replaces an existing image (validated: only with `overwrite`).
pub(super) fn create_image(config: &WriterConfig, mut levels: Vec<LevelInfo<()>>) -> Result<OpenedImage> {
    if config.exist_ok {
        if let Ok(stored) = Store::open(&config.path).and_then(|store| read_multiscale(&store, "")) {
            return open_image(config, stored, levels);
        }
    }
    // With exist_ok another process may be creating the same image: creating it again writes
    // the same metadata and keeps its chunks.
    let remote = config.path.url().is_some();
    if let Some(path) = config.path.local().filter(|p| config.overwrite && p.exists() && !is_empty_dir(p)) {
        fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
    }
    let (image, chain, root, store) = placement(config)?;
    if config.overwrite && remote {
        store.erase_below(&node_path(&root, &image))?;
    }
    for dir in &chain {
        if !is_zarr_node(dir)? {
            store_group(&store, &node_path(&root, dir), config.format, Default::default())?;
        }
    }
    let image_node = node_path(&root, &image);
    // The image's group node first (an interrupted creation leaves a zarr group that
    // `overwrite` may replace), its multiscales attributes last (a half-created image has none).
    store_group(&store, &image_node, config.format, Default::default())?;
    let mut opened = Vec::with_capacity(levels.len());
    for level in levels.drain(..) {
        let node = node_path(&root, &image.join(&level.name));
        let array = create_array(config, &store, &node, level.shape)?;
        opened.push(level.with_array(array));
    }
    let multiscales = vec![multiscale(config, &opened)];
    let attributes = match config.format {
        ZarrFormat::V2 => ImageAttributesJson {
            ome: None,
            multiscales: Some(multiscales),
        },
        ZarrFormat::V3 => ImageAttributesJson {
            ome: Some(OmeJson {
                version: Some("0.5".into()),
                multiscales: Some(multiscales),
            }),
            multiscales: None,
        },
    };
    let attributes = match serde_json::to_value(attributes) {
        Ok(serde_json::Value::Object(map)) => map,
        other => return Err(Error::metadata(&config.path, format!("cannot encode the multiscales: {other:?}"))),
    };
    store_group(&store, &image_node, config.format, attributes)?;
    Ok((store, opened, image_key(&root, &image)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creation_under_way_is_not_mistaken_for_user_data() {
        let tmp = crate::test_fixtures::TempDir::new("layout");
        let dir = tmp.join("image");
        fs::create_dir_all(dir.join("s0")).unwrap();
        // Another process's temporary, and its group metadata just renamed into place.
        fs::write(dir.join(".zattrs.77-1.partial"), b"{").unwrap();
        fs::write(dir.join(".zgroup"), b"{\"zarr_format\": 2}").unwrap();
        fs::write(dir.join("s0").join(".zarray.77-2.partial"), b"{").unwrap();
        assert!(is_interrupted_creation(&dir));
        // A file of the user's is not.
        fs::write(dir.join("s0").join("notes.txt"), b"mine").unwrap();
        assert!(!is_interrupted_creation(&dir));
    }
}
