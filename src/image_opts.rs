//! `--image-opts`: FILE is a qemu option string (`driver=raw,offset=1M,file.filename=d.img`),
//! with `,,` standing for a comma in a value. Parsed into the same options `-f`/`-o`/`--cache`
//! produce, with qemu's error wording.

use backends::aio::AioMode;
use backends::cache_mode::CacheMode;
use backends::detect_zeroes::DetectZeroes;
use backends::open::{Format, ImageOptions};
use backends::qcow2::BackingChoice;
use std::path::PathBuf;

/// What an option string asks for beyond [`ImageOptions`].
#[derive(Debug)]
pub struct ParsedImageOpts {
    pub image: ImageOptions,
    pub cache: CacheMode,
    pub detect_zeroes: DetectZeroes,
}

/// Split `a,b,,c` at single commas, `,,` standing for a comma inside an item (qemu's
/// option-string escaping, shared by `--image-opts` and `--object`).
pub fn split_items(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

/// Split `a=b,c=d,,e` into pairs, `,,` being a literal comma.
pub fn split_opts(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for it in split_items(s) {
        if it.is_empty() {
            continue;
        }
        match it.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => return Err(format!("Invalid parameter '{it}'")),
        }
    }
    Ok(out)
}

/// qemu's size syntax: a number with an optional k/M/G/T/P/E suffix (powers of 1024).
pub fn parse_size(key: &str, v: &str) -> Result<u64, String> {
    let err = || {
        format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )
    };
    let (num, mult) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(err()),
            };
            (&v[..i], 1u64 << shift)
        }
        _ => (v, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Turn an option string into image options; `read_only` comes from `-r`.
pub fn parse(s: &str, read_only: bool) -> Result<ParsedImageOpts, String> {
    let pairs = split_opts(s)?;
    let mut image = ImageOptions {
        read_only,
        ..Default::default()
    };
    let mut cache_direct = false;
    let mut no_flush = false;
    let mut detect_zeroes = DetectZeroes::Off;
    let mut driver: Option<String> = None;
    let mut file_driver: Option<String> = None;
    let mut filename: Option<String> = None;
    let mut backing_driver: Option<String> = None;
    let mut backing_file: Option<String> = None;
    for (k, v) in &pairs {
        if k == "driver" {
            driver = Some(v.clone());
        }
    }
    let fmt_name = driver.clone().unwrap_or_default();
    let is_protocol = fmt_name == "file" || fmt_name == "host_device";
    for (k, v) in pairs {
        match k.as_str() {
            "driver" => {}
            "read-only" => image.read_only |= on_off(&k, &v)?,
            "cache.direct" => cache_direct = on_off(&k, &v)?,
            "cache.no-flush" => no_flush = on_off(&k, &v)?,
            "discard" => {
                image.discard = match v.as_str() {
                    "ignore" | "off" => false,
                    "unmap" | "on" => true,
                    _ => return Err(format!("Invalid discard option '{v}'")),
                }
            }
            "detect-zeroes" => {
                detect_zeroes = match v.as_str() {
                    "off" => DetectZeroes::Off,
                    "on" => DetectZeroes::On,
                    "unmap" => DetectZeroes::Unmap,
                    _ => {
                        return Err(format!(
                            "Parameter 'detect-zeroes' does not accept value '{v}'"
                        ))
                    }
                }
            }
            "filename" if is_protocol => filename = Some(v),
            "offset" if fmt_name == "raw" => image.offset = parse_size(&k, &v)?,
            "size" if fmt_name == "raw" => image.size = Some(parse_size(&k, &v)?),
            "file" => filename = Some(v),
            "file.driver" => file_driver = Some(v),
            "file.filename" => filename = Some(v),
            "file.aio" | "aio" if k == "file.aio" || is_protocol => match AioMode::from_name(&v) {
                Some(m) => image.aio = m,
                None => return Err(format!("Parameter 'aio' does not accept value '{v}'")),
            },
            // qcow2's own options. The tuning ones (caches, overlap checks, discard passing)
            // are checked as qemu checks them; this engine sizes its caches itself.
            "backing" if fmt_name == "qcow2" => {
                if !v.is_empty() {
                    return Err(format!(
                        "Could not open backing file: Cannot find device='{v}' nor node-name='{v}'"
                    ));
                }
                eprintln!(
                    "{}: warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead",
                    crate::prog::name()
                );
                image.backing = BackingChoice::None;
            }
            "backing.driver" if fmt_name == "qcow2" => backing_driver = Some(v),
            "backing.file" | "backing.file.filename" if fmt_name == "qcow2" => {
                backing_file = Some(v)
            }
            "backing.file.driver" if fmt_name == "qcow2" => {
                if v != "file" && v != "host_device" {
                    return Err(format!("Unknown protocol '{v}'"));
                }
            }
            "lazy-refcounts" | "pass-discard-request" | "pass-discard-snapshot"
            | "pass-discard-other" | "discard-no-unref"
                if fmt_name == "qcow2" =>
            {
                on_off(&k, &v)?;
            }
            "l2-cache-size" | "l2-cache-entry-size" | "refcount-cache-size" | "cache-size"
                if fmt_name == "qcow2" =>
            {
                parse_size(&k, &v)?;
            }
            "cache-clean-interval" if fmt_name == "qcow2" => {
                if v.parse::<u64>().is_err() {
                    return Err(
                        "Parameter 'cache-clean-interval' expects a non-negative number".into(),
                    );
                }
            }
            "overlap-check" if fmt_name == "qcow2" => match v.as_str() {
                "none" | "constant" | "cached" | "all" => {}
                _ => {
                    return Err(format!(
                        "Unsupported value '{v}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
                    ))
                }
            },
            "file.locking" => match v.as_str() {
                "auto" | "on" | "off" => {}
                _ => return Err(format!("Parameter 'locking' does not accept value '{v}'")),
            },
            k if k.starts_with("file.") => {
                return Err(format!(
                    "Block protocol '{}' doesn't support the option '{}'",
                    file_driver.as_deref().unwrap_or("file"),
                    &k[5..]
                ))
            }
            k => {
                let what = if is_protocol { "protocol" } else { "format" };
                let name = if fmt_name.is_empty() {
                    "raw"
                } else {
                    fmt_name.as_str()
                };
                if is_protocol {
                    return Err(format!(
                        "Block {what} '{name}' doesn't support the option '{k}'"
                    ));
                }
                return Err(format!(
                    "Block {what} '{name}' does not support the option '{k}'"
                ));
            }
        }
    }
    if let Some(fd) = &file_driver {
        if fd != "file" && fd != "host_device" {
            return Err(format!("Unknown protocol '{fd}'"));
        }
    }
    image.format = match driver.as_deref() {
        None => None,
        Some("file") | Some("host_device") | Some("raw") => Some(Format::Raw),
        Some(d) => match Format::from_name(d) {
            Some(f) => Some(f),
            None => return Err(format!("Unknown driver '{d}'")),
        },
    };
    match (backing_file, backing_driver) {
        (Some(f), d) => {
            if let Some(d) = &d {
                if Format::from_name(d).is_none() {
                    return Err(format!("Could not open backing file: Unknown driver '{d}'"));
                }
            }
            image.backing = BackingChoice::File(PathBuf::from(f), d);
        }
        (None, Some(d)) => {
            if Format::from_name(&d).is_none() {
                return Err(format!("Could not open backing file: Unknown driver '{d}'"));
            }
            image.backing = BackingChoice::HeaderAs(d);
        }
        (None, None) => {}
    }
    let Some(filename) = filename else {
        return Err("A block device must be specified for \"file\"".into());
    };
    image.path = PathBuf::from(filename);
    image.direct = cache_direct;
    let cache = match (cache_direct, no_flush) {
        (_, true) => CacheMode::Unsafe,
        (true, false) => CacheMode::None,
        (false, false) => CacheMode::Writeback,
    };
    if detect_zeroes == DetectZeroes::Unmap && !image.discard {
        return Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into());
    }
    Ok(ParsedImageOpts {
        image,
        cache,
        detect_zeroes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_page_example() {
        let p = parse(
            "driver=raw,offset=1M,size=100M,file.driver=file,file.filename=disk.img",
            false,
        )
        .unwrap();
        assert_eq!(p.image.offset, 1 << 20);
        assert_eq!(p.image.size, Some(100 << 20));
        assert_eq!(p.image.path, PathBuf::from("disk.img"));
        assert_eq!(p.image.format, Some(Format::Raw));
    }

    #[test]
    fn double_comma_escapes() {
        let p = parse("driver=raw,file.filename=/a,,b.img", false).unwrap();
        assert_eq!(p.image.path, PathBuf::from("/a,b.img"));
    }

    #[test]
    fn errors_use_qemu_words() {
        let e = parse("driver=raw,file.filename=x,bogus=1", false).unwrap_err();
        assert_eq!(e, "Block format 'raw' does not support the option 'bogus'");
        let e = parse(
            "driver=raw,file.driver=file,file.filename=x,file.bogus=1",
            false,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "Block protocol 'file' doesn't support the option 'bogus'"
        );
        let e = parse("driver=bogus,file.filename=x", false).unwrap_err();
        assert_eq!(e, "Unknown driver 'bogus'");
        assert!(parse("driver=raw,offset=x,file.filename=x", false)
            .unwrap_err()
            .starts_with("Parameter 'offset'"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("s", "4096"), Ok(4096));
        assert_eq!(parse_size("s", "2G"), Ok(2 << 30));
        assert!(parse_size("s", "-1").is_err());
        assert!(parse_size("s", "99999999999E").is_err());
    }
}
