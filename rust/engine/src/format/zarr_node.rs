//! Zarr nodes read through a [`Store`]: a node's attributes from its v3 `zarr.json` or v2
//! `.zattrs` (with as few requests as a remote store allows), and an image group's multiscales
//! parsed by [`ngff`](super::ngff).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use zarrs::array::CodecMetadataOptions;
use zarrs::metadata::v3::MetadataV3;
use zarrs::metadata::ConfigurationSerialize;
use zarrs::metadata_ext::codec::sharding::ShardingCodecConfiguration;

use super::dtype::DType;
use super::ngff::{multiscale_from_attributes, LevelMeta, Multiscale, ZarrFormat};
use crate::error::{Error, ErrorKind, Result};
use crate::io::store::Store;

/// A node's type as `zarr.json` declares it.
#[derive(Debug, Deserialize)]
struct NodeTypeJson {
    node_type: String,
}

/// Whether the local zarr v3 node at `node` (its `zarr.json`) is an array; `None` when it has
/// no readable `zarr.json`.
pub fn is_v3_array(node: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(node.join("zarr.json")).ok()?;
    let parsed: NodeTypeJson = serde_json::from_str(&text).ok()?;
    Some(parsed.node_type == "array")
}

/// A node's documents as read: its format, its attributes, and whether it is an array (v3
/// `node_type`; v2 `.zarray`, probed only when asked).
struct NodeDocuments {
    format: ZarrFormat,
    attributes: Value,
    array: Option<bool>,
}

/// The documents of the node `node` (slash-separated, relative to the store's root): v3
/// `zarr.json`, else v2 `.zattrs` (`.zgroup`, `.zarray` when there is none). `None` when the
/// node has no zarr metadata. Over a remote store this is one request for a v3 node and two for
/// a v2 node with attributes; nothing is listed.
fn read_node(store: &Store, node: &str) -> Result<Option<NodeDocuments>> {
    #[derive(Deserialize)]
    struct V3Node {
        #[serde(default)]
        attributes: Option<Value>,
        #[serde(default)]
        node_type: Option<String>,
    }
    let node = node.trim_matches('/');
    let location = store.location().join(node);
    let key = |name: &str| {
        if node.is_empty() {
            name.to_string()
        } else {
            format!("{node}/{name}")
        }
    };
    let remote = store.remote().is_some();
    // S3 answers 403, not 404, for a missing key where listing is not allowed: a probe for the
    // other format's document may be refused although the node is readable.
    let mut denied: Option<Error> = None;
    let mut probe = |name: &str| match store.read_text(&key(name)) {
        Err(e) if remote && e.kind() == ErrorKind::PermissionDenied => {
            denied.get_or_insert(e);
            Ok(None)
        }
        other => other,
    };
    if let Some(text) = probe("zarr.json")? {
        let v3 = location.join("zarr.json");
        let doc: V3Node = serde_json::from_str(&text).map_err(|e| Error::metadata(&v3, format!("malformed zarr.json: {e}")))?;
        return Ok(Some(NodeDocuments {
            format: ZarrFormat::V3,
            attributes: doc.attributes.unwrap_or(Value::Object(Default::default())),
            array: Some(doc.node_type.as_deref() == Some("array")),
        }));
    }
    if let Some(text) = probe(".zattrs")? {
        let v2 = location.join(".zattrs");
        let value = serde_json::from_str(&text).map_err(|e| Error::metadata(&v2, format!("malformed JSON: {e}")))?;
        return Ok(Some(NodeDocuments {
            format: ZarrFormat::V2,
            attributes: value,
            array: None,
        }));
    }
    if probe(".zgroup")?.is_some() {
        return Ok(Some(NodeDocuments {
            format: ZarrFormat::V2,
            attributes: Value::Object(Default::default()),
            array: Some(false),
        }));
    }
    if probe(".zarray")?.is_some() {
        return Ok(Some(NodeDocuments {
            format: ZarrFormat::V2,
            attributes: Value::Object(Default::default()),
            array: Some(true),
        }));
    }
    match denied {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// The attributes of the group or array `node` (slash-separated, relative to the store's root):
/// v3 `zarr.json` attributes, else v2 `.zattrs`; an error names a location without zarr
/// metadata.
pub fn read_attributes(store: &Store, node: &str) -> Result<(ZarrFormat, Value)> {
    if let Some(found) = read_node(store, node)? {
        return Ok((found.format, found.attributes));
    }
    let location = store.location().join(node.trim_matches('/'));
    match location.local() {
        Some(path) if path.exists() => Err(Error::metadata(
            path,
            "not a zarr group or array (no zarr.json, .zgroup or .zattrs)",
        )),
        Some(path) => Err(Error::not_found(path)),
        None => Err(Error::not_found_because(
            &location,
            "no zarr.json, .zattrs, .zgroup or .zarray there",
        )),
    }
}

/// What a zarr node is, in one record: what `inspect`, `find_level` and the dataset's probes
/// ask, so that nothing outside the engine reads zarr or OME-NGFF JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeDescription {
    /// The node's path or URL.
    pub location: String,
    /// `"group"` or `"array"`; `None` where there is no zarr metadata.
    pub kind: Option<&'static str>,
    /// 2 or 3.
    pub zarr_format: Option<u8>,
    /// The node's attributes (v3 `attributes`, v2 `.zattrs`), as stored.
    pub attributes: Value,
    /// The first OME-NGFF multiscale of an image group.
    pub multiscale: Option<MultiscaleDescription>,
    /// Why attributes that declare multiscales (`multiscales`, `ome`) could not be read as one.
    pub multiscale_error: Option<String>,
    /// Shape, chunks, data type and codecs of an array.
    pub array: Option<ArrayDescription>,
}

/// An image group's multiscale: version, axes and levels (top-level transforms folded in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultiscaleDescription {
    /// `0.4`, `0.5`, ...
    pub version: String,
    /// Axes in array order.
    pub axes: Vec<AxisDescription>,
    /// Levels as listed (finest first in CellMap data).
    pub levels: Vec<LevelMeta>,
}

/// One axis of a multiscale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AxisDescription {
    /// e.g. `z`.
    pub name: String,
    /// `space`, `channel`, `time`, or `None` when unsaid.
    pub kind: Option<String>,
    /// e.g. `nanometer`.
    pub unit: Option<String>,
    /// Whether the engine samples along it.
    pub spatial: bool,
}

/// An array's layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArrayDescription {
    /// Shape, every axis.
    pub shape: Vec<u64>,
    /// Chunk shape (a sharded array's shards).
    pub chunks: Vec<u64>,
    /// A sharded array's inner chunk shape.
    pub inner_chunks: Option<Vec<u64>>,
    /// e.g. `uint8`.
    pub data_type: String,
    /// Codecs, outermost last, in zarr v3 form (a v2 compressor becomes its v3 codec).
    pub codecs: Vec<CodecDescription>,
}

/// One codec and its configuration; a sharding codec lists its inner chunks' codecs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodecDescription {
    /// e.g. `zstd`.
    pub name: String,
    /// Its parameters (a sharding codec's inner codecs are under `inner`).
    pub configuration: serde_json::Map<String, Value>,
    /// A sharding codec's inner codecs.
    pub inner: Vec<CodecDescription>,
}

fn codec_descriptions(metadatas: &[MetadataV3]) -> Vec<CodecDescription> {
    metadatas
        .iter()
        .map(|m| {
            let mut configuration: serde_json::Map<String, Value> = m.configuration().map(|c| (**c).clone()).unwrap_or_default();
            let mut inner = Vec::new();
            if m.name() == "sharding_indexed" {
                if let Some(ShardingCodecConfiguration::V1(v1)) = m
                    .configuration()
                    .and_then(|c| ShardingCodecConfiguration::try_from_configuration(c.clone()).ok())
                {
                    inner = codec_descriptions(&v1.codecs);
                    // The inner chunk shape is the array's `inner_chunks`; the index's own codecs
                    // say nothing about the data.
                    for key in ["codecs", "chunk_shape", "index_codecs"] {
                        configuration.remove(key);
                    }
                }
            }
            CodecDescription {
                name: m.name().to_string(),
                configuration,
                inner,
            }
        })
        .collect()
}

fn describe_array(store: &Store, node: &str, location: &crate::io::location::Location) -> Result<ArrayDescription> {
    use zarrs::array::{Array, ArrayShardedExt};
    let array = Array::open(store.storage(), &format!("/{}", node.trim_matches('/'))).map_err(|e| Error::metadata(location, e))?;
    let chunks = array
        .chunk_shape(&vec![0; array.dimensionality()])
        .map_err(|e| Error::metadata(location, e))?;
    let data_type = array.data_type();
    Ok(ArrayDescription {
        shape: array.shape().to_vec(),
        chunks: chunks.iter().map(|c| c.get()).collect(),
        inner_chunks: array.effective_subchunk_shape().map(|s| s.iter().map(|c| c.get()).collect()),
        data_type: DType::from_zarrs(data_type).map_or_else(|| data_type.to_string(), |d| d.name().to_string()),
        codecs: codec_descriptions(&array.codecs().create_metadatas(&CodecMetadataOptions::default())),
    })
}

/// Describes the zarr node `node` of `store` (see [`NodeDescription`]); a location without zarr
/// metadata is described as such (`kind: None`), not refused.
pub fn describe(store: &Store, node: &str) -> Result<NodeDescription> {
    let location = store.location().join(node.trim_matches('/'));
    let Some(found) = read_node(store, node)? else {
        return Ok(NodeDescription {
            location: location.to_string(),
            kind: None,
            zarr_format: None,
            attributes: Value::Object(Default::default()),
            multiscale: None,
            multiscale_error: None,
            array: None,
        });
    };
    let is_array = match found.array {
        Some(known) => known,
        None => store
            .read_text(format!("{}/.zarray", node.trim_matches('/')).trim_start_matches('/'))?
            .is_some(),
    };
    let declares = |key: &str| found.attributes.get(key).is_some();
    let (multiscale, multiscale_error) = if !is_array && (declares("multiscales") || declares("ome")) {
        match multiscale_from_attributes(found.format, &found.attributes, &location) {
            Ok(m) => (
                Some(MultiscaleDescription {
                    version: m.version,
                    axes: m
                        .axes
                        .iter()
                        .map(|a| AxisDescription {
                            name: a.name.clone(),
                            kind: a.kind.clone(),
                            unit: a.unit.clone(),
                            spatial: a.is_spatial(),
                        })
                        .collect(),
                    levels: m.levels,
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };
    Ok(NodeDescription {
        location: location.to_string(),
        kind: Some(if is_array { "array" } else { "group" }),
        zarr_format: Some(match found.format {
            ZarrFormat::V2 => 2,
            ZarrFormat::V3 => 3,
        }),
        array: if is_array {
            Some(describe_array(store, node, &location)?)
        } else {
            None
        },
        attributes: found.attributes,
        multiscale,
        multiscale_error,
    })
}

/// The multiscale metadata of the image group `node` of `store`.
pub fn read_multiscale(store: &Store, node: &str) -> Result<Multiscale> {
    let (format, attrs) = read_attributes(store, node)?;
    multiscale_from_attributes(format, &attrs, &store.location().join(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::location::Location;
    use serde_json::json;

    #[test]
    fn cellmap_style_attributes_with_extra_keys_are_read() {
        // CellMap images carry keys this crate does not use (multiscale "type" and "metadata",
        // axis units per level, ...); they must not get in the way.
        let dir = std::env::temp_dir().join(format!("cellmap-ngff-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let attrs = json!({"multiscales": [{"version": "0.4", "name": "raw", "type": "mean",
            "metadata": {"description": "downscaled"},
            "axes": [{"name": "z", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [8.0, 8.0, 8.0]}, {"type": "translation", "translation": [0.0, 0.0, 0.0]}]}],
            "coordinateTransformations": [{"type": "identity"}]}],
            "cellmap": {"annotation": {"complement_counts": {"absent": 3}}}});
        std::fs::write(dir.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
        std::fs::write(dir.join(".zattrs"), attrs.to_string()).unwrap();
        let m = read_multiscale(&Store::open(&Location::Local(dir.clone())).unwrap(), "").unwrap();
        assert_eq!(m.levels[0].scale, vec![8.0; 3]);
        // A 0.5 image keeps its version beside the multiscales.
        std::fs::remove_file(dir.join(".zgroup")).unwrap();
        std::fs::remove_file(dir.join(".zattrs")).unwrap();
        let ome = json!({"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5",
            "multiscales": [{"axes": ["z", "y", "x"], "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0, 4.0]}]}]}]}}});
        std::fs::write(dir.join("zarr.json"), ome.to_string()).unwrap();
        let m = read_multiscale(&Store::open(&Location::Local(dir.clone())).unwrap(), "").unwrap();
        assert_eq!(m.version, "0.5");
        assert_eq!(is_v3_array(&dir), Some(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
