//! `--image-opts`: FILE is a qemu option string (`driver=raw,offset=1M,file.filename=d.img`),
//! with `,,` standing for a comma in a value. Parsed into the same options `-f`/`-o`/`--cache`
//! produce, with qemu's error wording.

use backends::aio::AioMode;
use backends::cache_mode::CacheMode;
use backends::detect_zeroes::DetectZeroes;
use backends::open::{Format, ImageOptions};
use std::path::PathBuf;

/// What an option string asks for beyond [`ImageOptions`].
#[derive(Debug)]
pub struct ParsedImageOpts {
    pub image: ImageOptions,
    pub cache: CacheMode,
    pub detect_zeroes: DetectZeroes,
    /// An option no driver takes: qemu reports it only once the image opened, so the
    /// caller does too.
    pub unknown_option: Option<String>,
    /// `read-only=on` (or `file.read-only=on`): the node itself is read-only, so qemu-nbd
    /// refuses it once opened unless the export is read-only too (`-r`).
    pub node_read_only: bool,
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

/// Split `a=b,c=d,,e` into pairs, `,,` being a literal comma. As qemu's option parser, a
/// first item without `=` is the value of `file`, and a later one is a short-form boolean
/// (`foo` is `foo=on`, `nofoo` is `foo=off`), deprecated with a warning pushed to `warnings`.
pub fn split_opts(s: &str, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, it) in split_items(s).into_iter().enumerate() {
        if it.is_empty() {
            continue;
        }
        match it.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None if i == 0 => out.push(("file".to_string(), it)),
            None => {
                let (k, v) = match it.strip_prefix("no") {
                    Some(k) => (k, "off"),
                    None => (it.as_str(), "on"),
                };
                warnings.push(format!(
                    "short-form boolean option '{it}' deprecated\nPlease use {k}={v} instead"
                ));
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

use backends::format::parse_bool as on_off;

/// The warnings qemu's option parser prints for `s` (deprecated short-form booleans).
pub fn warnings(s: &str) -> Vec<String> {
    let mut w = Vec::new();
    split_opts(s, &mut w);
    w
}

/// Turn an option string into image options; `read_only` comes from `-r`.
pub fn parse(s: &str, read_only: bool) -> Result<ParsedImageOpts, String> {
    // The caller prints the warnings (see [`warnings`]) before anything can fail.
    parse_pairs(split_opts(s, &mut Vec::new()), read_only)
}

/// Image options from (key, value) pairs, as `--image-opts` and `json:` file names give them.
pub fn parse_pairs(
    pairs: Vec<(String, String)>,
    read_only: bool,
) -> Result<ParsedImageOpts, String> {
    let mut image = ImageOptions {
        read_only,
        ..Default::default()
    };
    if pairs.iter().any(|(k, v)| k == "driver" && v == "compress") {
        return parse_compress(&pairs, read_only);
    }
    if let Some((_, d)) = pairs
        .iter()
        .find(|(k, v)| k == "driver" && (v == "null-co" || v == "null-aio"))
    {
        return parse_null(d, &pairs, read_only);
    }
    // `file=NAME` names a block node, which qemu-nbd never has.
    let mut node_ref: Option<String> = None;
    let mut cache_direct = false;
    let mut no_flush = false;
    let mut detect_zeroes = DetectZeroes::Off;
    let mut node_read_only = false;
    let mut driver: Option<String> = None;
    let mut file_driver: Option<String> = None;
    let mut filename: Option<String> = None;
    // The protocol's unknown options are found first (its node is opened first).
    let mut unknown_proto: Option<String> = None;
    let mut unknown_fmt: Option<String> = None;
    for (k, v) in &pairs {
        if k == "driver" {
            driver = Some(v.clone());
        }
    }
    let fmt_name = driver.clone().unwrap_or_default();
    let is_nbd = fmt_name == "nbd";
    let is_http = is_http_driver(&fmt_name);
    let is_protocol = fmt_name == "file" || fmt_name == "host_device" || is_nbd || is_http;
    // `file.driver=nbd`: the format's file is an NBD export.
    let file_nbd = !is_protocol && pairs.iter().any(|(k, v)| k == "file.driver" && v == "nbd");
    // `file.driver=http|https`: the format's file is on a web server.
    let file_http = !is_protocol
        && pairs
            .iter()
            .any(|(k, v)| k == "file.driver" && is_http_driver(v));
    let mut nbd = NbdOpts::default();
    let mut http = backends::file::http::HttpOptions::default();
    let mut http_url: Option<String> = None;
    // The format's own keys (raw's window, qcow2's backing and tuning options).
    let format_driver = if is_protocol {
        None
    } else {
        Format::from_name(if fmt_name.is_empty() {
            "raw"
        } else {
            &fmt_name
        })
    };
    for (k, v) in pairs {
        let nbd_key = if is_nbd {
            Some(k.as_str())
        } else if file_nbd {
            k.strip_prefix("file.")
        } else {
            None
        };
        if let Some(key) = nbd_key {
            if nbd.take(key, &v) {
                continue;
            }
        }
        let http_key = if is_http {
            Some(k.as_str())
        } else if file_http {
            k.strip_prefix("file.")
        } else {
            None
        };
        if let Some(key) = http_key {
            if take_http_option(&mut http, &mut http_url, key, &v)? {
                continue;
            }
        }
        if let Some(d) = format_driver {
            if let Some(r) = (d.driver().option)(&k, &v, &mut image) {
                r?;
                continue;
            }
        }
        match k.as_str() {
            "driver" => {}
            "read-only" | "file.read-only" if (k == "file.read-only") != is_protocol => {
                node_read_only |= on_off(&k, &v)?;
            }
            "read-only" => node_read_only |= on_off(&k, &v)?,
            "cache.direct" => cache_direct = on_off(&k, &v)?,
            "cache.no-flush" => no_flush = on_off(&k, &v)?,
            "discard" => {
                image.discard = match v.as_str() {
                    "ignore" | "off" => false,
                    "unmap" | "on" => true,
                    _ => return Err("Invalid discard option".into()),
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
            // qemu's nbd driver takes no file name among its options.
            "filename" if is_nbd => {}
            "filename" if is_protocol => filename = Some(v),
            // A protocol driver has no `file` child: these are unknown options to it.
            "file" if !is_protocol => node_ref = Some(v),
            "file.driver" if !is_protocol => file_driver = Some(v),
            "file.filename" if !is_protocol => filename = Some(v),
            "file.aio" | "aio" if (k == "file.aio") != is_protocol => {
                match AioMode::from_name(&v) {
                    Some(m) => image.aio = m,
                    None => return Err(format!("Parameter 'aio' does not accept value '{v}'")),
                }
            }
            "file.locking" | "locking" if (k == "file.locking") != is_protocol => {
                image.locking =
                    backends::file::lock::Locking::from_name(&v).map_err(|e| e.to_string())?
            }
            "force-share" => image.force_share = on_off(&k, &v)?,
            k if k.starts_with("file.") && !is_protocol => {
                unknown_proto.get_or_insert(k[5..].to_string());
            }
            k => {
                let what = if is_protocol { "protocol" } else { "format" };
                let name = if fmt_name.is_empty() {
                    "raw"
                } else {
                    fmt_name.as_str()
                };
                let msg = if is_protocol {
                    format!("Block {what} '{name}' doesn't support the option '{k}'")
                } else {
                    format!("Block {what} '{name}' does not support the option '{k}'")
                };
                unknown_fmt.get_or_insert(msg);
            }
        }
    }
    if is_nbd || file_nbd {
        let (url, remote) = nbd.url()?;
        filename = Some(url);
        image.remote = remote;
    }
    if is_http || file_http {
        http.protocol = if is_http {
            driver.clone()
        } else {
            file_driver.clone()
        };
        image.remote.http = http;
        // qemu's curl driver checks its own options before it asks for the URL.
        filename = Some(http_url.unwrap_or_default());
    }
    if let Some(fd) = &file_driver {
        if fd != "file" && fd != "host_device" && fd != "nbd" && !is_http_driver(fd) {
            return Err(format!("Unknown driver '{fd}'"));
        }
    }
    image.format = match driver.as_deref() {
        None => None,
        Some("file") | Some("host_device") | Some("nbd") | Some("http") | Some("https") => {
            Some(Format::raw())
        }
        Some(d) => match Format::from_name(d) {
            Some(f) => Some(f),
            None => return Err(format!("Unknown driver '{d}'")),
        },
    };
    if let Some(r) = node_ref {
        return Err(format!("Cannot find device='{r}' nor node-name='{r}'"));
    }
    let Some(filename) = filename else {
        if driver.is_none() {
            return Err("Must specify either driver or file".into());
        }
        if is_protocol || file_driver.is_some() {
            return Err(format!(
                "The '{}' block driver requires a file name",
                file_driver
                    .as_deref()
                    .or(driver.as_deref())
                    .unwrap_or("file")
            ));
        }
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
    let unknown_option = unknown_proto
        .map(|k| {
            format!(
                "Block protocol '{}' doesn't support the option '{k}'",
                file_driver.as_deref().unwrap_or("file")
            )
        })
        .or(unknown_fmt);
    image.read_only |= node_read_only;
    Ok(ParsedImageOpts {
        image,
        cache,
        detect_zeroes,
        unknown_option,
        node_read_only,
    })
}

fn is_http_driver(d: &str) -> bool {
    d == "http" || d == "https"
}

/// Keep `key` if it is one of qemu's curl driver options (`filename` is its URL too);
/// Ok(false) when it is not, an error for a value of the wrong type.
fn take_http_option(
    o: &mut backends::file::http::HttpOptions,
    url: &mut Option<String>,
    key: &str,
    v: &str,
) -> Result<bool, String> {
    let s = || Some(v.to_string());
    match key {
        "url" | "filename" => *url = s(),
        "readahead" => o.readahead = Some(backends::format::parse_size(key, v)?),
        "timeout" => o.timeout = Some(parse_number(key, v)?),
        "sslverify" => o.sslverify = Some(on_off(key, v)?),
        "cookie" => o.cookie = s(),
        "cookie-secret" => o.cookie_secret = s(),
        "username" => o.username = s(),
        "password-secret" => o.password_secret = s(),
        "proxy-username" => o.proxy_username = s(),
        "proxy-password-secret" => o.proxy_password_secret = s(),
        _ => return Ok(false),
    }
    Ok(true)
}

/// qemu's number options (`qemu_strtou64`: a negative number wraps around, so it is taken
/// as a very large one).
fn parse_number(key: &str, v: &str) -> Result<u64, String> {
    let t = v.trim_start();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t),
    };
    let n = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(h, 16)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|_| format!("Parameter '{key}' expects a number"))?;
    Ok(if neg { n.wrapping_neg() } else { n })
}

/// qemu's `nbd` protocol options: where the server is, the export, TLS.
#[derive(Default)]
struct NbdOpts {
    server: Vec<(String, String)>,
    export: String,
    tls_creds: Option<String>,
    tls_hostname: Option<String>,
    reconnect_delay: Option<String>,
    open_timeout: Option<String>,
}

/// Characters that would end a URI's part early, escaped.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '?' | '#' | '&' | '=' | ' ' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl NbdOpts {
    /// Keep `key` if it is one of the driver's; false when it is not.
    fn take(&mut self, key: &str, v: &str) -> bool {
        match key {
            k if k.starts_with("server.") => self.server.push((k[7..].to_string(), v.to_string())),
            "export" => self.export = v.to_string(),
            "tls-creds" => self.tls_creds = Some(v.to_string()),
            "tls-hostname" => self.tls_hostname = Some(v.to_string()),
            "reconnect-delay" => self.reconnect_delay = Some(v.to_string()),
            "open-timeout" => self.open_timeout = Some(v.to_string()),
            _ => return false,
        }
        true
    }

    /// A number of seconds (qemu's QEMU_OPT_NUMBER, kept as its uint32 field keeps it).
    fn seconds(key: &str, v: Option<&String>) -> Result<u64, String> {
        v.map_or(Ok(0), |v| {
            parse_number(key, v).map(|n| n & u64::from(u32::MAX))
        })
    }

    fn get(&self, key: &str) -> Result<&str, String> {
        self.server
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("Parameter '{key}' is missing"))
    }

    /// The image name the options stand for (an NBD URI) and how it is reached.
    fn url(&self) -> Result<(String, backends::file::remote::RemoteOptions), String> {
        if self.server.is_empty() {
            return Err("NBD server address missing".into());
        }
        let export = uri_escape(&self.export);
        let url = match self.get("type")? {
            "unix" => format!(
                "nbd+unix:///{export}?socket={}",
                uri_escape(self.get("path")?)
            ),
            "inet" => {
                let host = self.get("host")?;
                let port = self.get("port")?;
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                format!("nbd://{host}:{port}/{export}")
            }
            t @ ("fd" | "vsock") => {
                return Err(format!("NBD servers of type '{t}' are not supported"))
            }
            t => return Err(format!("Parameter 'type' does not accept value '{t}'")),
        };
        let remote = backends::file::remote::RemoteOptions {
            read_only: false,
            tls_creds: self.tls_creds.clone(),
            tls_hostname: self.tls_hostname.clone(),
            reconnect_delay: Self::seconds("reconnect-delay", self.reconnect_delay.as_ref())?,
            open_timeout: Self::seconds("open-timeout", self.open_timeout.as_ref())?,
            ..Default::default()
        };
        Ok((url, remote))
    }
}

/// `driver=null-co` (or `null-aio`): qemu's protocol with no storage, `size=` bytes (1 GiB by
/// default), reading as zeroes.
fn parse_null(
    driver: &str,
    pairs: &[(String, String)],
    read_only: bool,
) -> Result<ParsedImageOpts, String> {
    let mut null = backends::null::NullOptions::default();
    let mut image = ImageOptions {
        read_only,
        path: PathBuf::from(format!("{driver}://")),
        format: Some(Format::raw()),
        ..Default::default()
    };
    let mut unknown = None;
    let mut node_read_only = false;
    for (k, v) in pairs {
        match k.as_str() {
            "driver" => {}
            "size" => null.size = backends::format::parse_size(k, v)?,
            "read-zeroes" => null.read_zeroes = on_off(k, v)?,
            "latency-ns" => {
                v.parse::<u64>()
                    .map_err(|_| format!("Parameter '{k}' expects a number"))?;
            }
            "read-only" => node_read_only |= on_off(k, v)?,
            "force-share" => image.force_share = on_off(k, v)?,
            _ => {
                unknown.get_or_insert(format!(
                    "Block protocol '{driver}' doesn't support the option '{k}'"
                ));
            }
        }
    }
    image.null = Some(null);
    image.read_only |= node_read_only;
    Ok(ParsedImageOpts {
        image,
        cache: CacheMode::Writeback,
        detect_zeroes: DetectZeroes::Off,
        unknown_option: unknown,
        node_read_only,
    })
}

/// Options that apply to a filter's node and its child alike.
const NODE_OPTIONS: [&str; 6] = [
    "read-only",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
    "force-share",
];

/// `driver=compress`: qemu's filter over the image its `file.` options describe, which must
/// be a format that stores compressed clusters (qcow2).
fn parse_compress(pairs: &[(String, String)], read_only: bool) -> Result<ParsedImageOpts, String> {
    let mut inner = Vec::new();
    let mut unknown = None;
    for (k, v) in pairs {
        if let Some(child) = k.strip_prefix("file.") {
            inner.push(format!("{child}={}", v.replace(',', ",,")));
        } else if NODE_OPTIONS.contains(&k.as_str()) {
            inner.push(format!("{k}={}", v.replace(',', ",,")));
        } else if k != "driver" {
            unknown.get_or_insert(format!(
                "Block format 'compress' does not support the option '{k}'"
            ));
        }
    }
    if !inner.iter().any(|o| o.starts_with("driver=")) {
        // The child is then the protocol itself, which stores nothing compressed.
        return Err("Compression is not supported for underlying format: file".into());
    }
    let mut p = parse(&inner.join(","), read_only)?;
    p.image.compress = true;
    p.unknown_option = unknown.or(p.unknown_option);
    Ok(p)
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
        assert_eq!(p.image.format, Some(Format::raw()));
    }

    #[test]
    fn double_comma_escapes() {
        let p = parse("driver=raw,file.filename=/a,,b.img", false).unwrap();
        assert_eq!(p.image.path, PathBuf::from("/a,b.img"));
    }

    #[test]
    fn errors_use_qemu_words() {
        // Unknown options are reported once the image opened, as qemu's block layer does.
        let e = parse("driver=raw,file.filename=x,bogus=1", false).unwrap();
        assert_eq!(
            e.unknown_option.unwrap(),
            "Block format 'raw' does not support the option 'bogus'"
        );
        let e = parse(
            "driver=raw,file.filename=x,bogus=1,file.bogus=1,file.driver=file",
            false,
        )
        .unwrap();
        assert_eq!(
            e.unknown_option.unwrap(),
            "Block protocol 'file' doesn't support the option 'bogus'"
        );
        let e = parse("driver=raw,bogus=1", false).unwrap_err();
        assert_eq!(e, "A block device must be specified for \"file\"");
        let e = parse("driver=file,file.filename=x", false).unwrap_err();
        assert_eq!(e, "The 'file' block driver requires a file name");
        let e = parse("driver=bogus,file.filename=x", false).unwrap_err();
        assert_eq!(e, "Unknown driver 'bogus'");
        assert!(parse("driver=raw,offset=x,file.filename=x", false)
            .unwrap_err()
            .starts_with("Parameter 'offset'"));
    }
}
