//! qemu's `json:` pseudo-protocol: a file name `json:{"driver":"qcow2","file":{...}}` is the
//! image's options as a JSON object, read as `--image-opts` reads its keys (nested objects
//! joined with `.`, `true`/`false` as `on`/`off`, numbers in decimal, list items numbered).

use crate::image_opts::{parse_pairs, ParsedImageOpts};
use serde_json::{Map, Value};

pub const PREFIX: &str = "json:";

/// What `backing_option` warns of for `backing=`; a JSON `null` is the proper spelling.
const EMPTY_BACKING_WARNING: &str = "Use of \"backing\": \"\" is deprecated";

/// The image options of a `json:` file name; `format` (`-f`) replaces the object's driver,
/// as in qemu-nbd.
pub fn parse(name: &str, read_only: bool, format: Option<&str>) -> Result<ParsedImageOpts, String> {
    let (pairs, null_backing) = pairs(name, format)?;
    let mut p = parse_pairs(pairs, read_only)?;
    if null_backing {
        p.image
            .warnings
            .retain(|w| !w.starts_with(EMPTY_BACKING_WARNING));
    }
    Ok(p)
}

/// The object's members as option pairs, and whether it said `"backing": null`.
fn pairs(name: &str, format: Option<&str>) -> Result<(Vec<(String, String)>, bool), String> {
    let text = name.strip_prefix(PREFIX).unwrap_or(name);
    let v: Value = serde_json::from_str(text).map_err(|e| {
        // qemu's parser names only a text cut short the same way.
        let why = if e.is_eof() {
            "premature EOI".to_string()
        } else {
            e.to_string()
        };
        format!("Could not parse the JSON options: JSON parse error, {why}")
    })?;
    let Value::Object(map) = v else {
        return Err("Invalid JSON object given".into());
    };
    let mut out = Vec::new();
    let mut null_backing = false;
    flatten("", &map, &mut out, &mut null_backing)?;
    if let Some(f) = format {
        out.retain(|(k, _)| k != "driver");
        out.insert(0, ("driver".into(), f.into()));
    }
    Ok((out, null_backing))
}

fn flatten(
    prefix: &str,
    map: &Map<String, Value>,
    out: &mut Vec<(String, String)>,
    null_backing: &mut bool,
) -> Result<(), String> {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        value(key, v, out, null_backing)?;
    }
    Ok(())
}

fn value(
    key: String,
    v: &Value,
    out: &mut Vec<(String, String)>,
    null_backing: &mut bool,
) -> Result<(), String> {
    match v {
        Value::Object(m) => flatten(&key, m, out, null_backing)?,
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                value(format!("{key}.{i}"), item, out, null_backing)?;
            }
        }
        Value::String(s) => out.push((key, s.clone())),
        Value::Bool(b) => out.push((key, if *b { "on" } else { "off" }.into())),
        Value::Number(n) => out.push((key, n.to_string())),
        // No backing file at all (qemu's `"backing": null`).
        Value::Null if key == "backing" => {
            *null_backing = true;
            out.push((key, String::new()));
        }
        Value::Null => {
            return Err(format!(
                "Invalid parameter type for '{key}', expected: string"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_flatten_to_image_opts_keys() {
        let (p, null) = pairs(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a,b.qcow2","locking":false},"backing":null,"cache":{"direct":true},"l2-cache-size":1048576}"#,
            None,
        )
        .unwrap();
        assert!(null);
        let get = |k: &str| p.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("driver"), Some("qcow2"));
        assert_eq!(get("file.filename"), Some("a,b.qcow2"));
        assert_eq!(get("file.locking"), Some("off"));
        assert_eq!(get("cache.direct"), Some("on"));
        assert_eq!(get("l2-cache-size"), Some("1048576"));
        assert_eq!(get("backing"), Some(""));
        let (p, _) = pairs(
            r#"json:{"driver":"qcow2","file":{"filename":"x"}}"#,
            Some("raw"),
        )
        .unwrap();
        assert_eq!(p[0], ("driver".to_string(), "raw".to_string()));
        assert_eq!(p.iter().filter(|(k, _)| k == "driver").count(), 1);
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(
            pairs("json:[1]", None).unwrap_err(),
            "Invalid JSON object given"
        );
        assert!(pairs("json:{", None)
            .unwrap_err()
            .starts_with("Could not parse the JSON options: JSON parse error"));
    }
}
