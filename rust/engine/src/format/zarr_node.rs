//! Zarr nodes read through a [`Store`]: a node's attributes from its v3 `zarr.json` or v2
//! `.zattrs` (with as few requests as a remote store allows), and an image group's multiscales
//! parsed by [`ngff`](super::ngff).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ngff::{multiscale_from_attributes, Multiscale, ZarrFormat};
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

/// The attributes of the group or array `node` (slash-separated, relative to the store's root):
/// v3 `zarr.json` attributes, else v2 `.zattrs`. Over a remote store this is one request for a
/// v3 node and two for a v2 node with attributes; nothing is listed.
pub fn read_attributes(store: &Store, node: &str) -> Result<(ZarrFormat, Value)> {
    #[derive(Deserialize)]
    struct V3Node {
        #[serde(default)]
        attributes: Option<Value>,
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
        return Ok((ZarrFormat::V3, doc.attributes.unwrap_or(Value::Object(Default::default()))));
    }
    if let Some(text) = probe(".zattrs")? {
        let v2 = location.join(".zattrs");
        let value = serde_json::from_str(&text).map_err(|e| Error::metadata(&v2, format!("malformed JSON: {e}")))?;
        return Ok((ZarrFormat::V2, value));
    }
    if probe(".zgroup")?.is_some() || probe(".zarray")?.is_some() {
        return Ok((ZarrFormat::V2, Value::Object(Default::default())));
    }
    if let Some(e) = denied {
        return Err(e);
    }
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

/// The multiscale metadata of the image group `node` of `store`.
pub fn read_multiscale(store: &Store, node: &str) -> Result<Multiscale> {
    let (format, attrs) = read_attributes(store, node)?;
    multiscale_from_attributes(format, &attrs, &store.location().join(node).display_path())
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
