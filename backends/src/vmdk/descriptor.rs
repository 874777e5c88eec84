//! The VMDK text descriptor: which extents make the disk, its content id (CID), its parent's.
//! Read as qemu's `vmdk.c` reads it (substring searches and `sscanf`-shaped extent lines), so
//! an image qemu opens opens here the same way, with its messages.

/// What qemu reads of a descriptor at most (it caps its read at 1 MiB).
pub const MAX_TEXT: usize = (1 << 20) - 1;

/// The region of a hosted sparse extent that holds its descriptor (qemu's DESC_SIZE).
pub const EMBEDDED_SIZE: usize = 20 * 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// FLAT and VMFS: the disk's bytes at an offset of a plain file.
    Flat,
    /// SPARSE and VMFSSPARSE: a sparse extent file with its own header.
    Sparse,
}

/// One `RW SECTORS TYPE "FILE" [OFFSET]` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub sectors: u64,
    pub kind: ExtentKind,
    pub file: String,
    /// Where a flat extent starts in its file, in sectors.
    pub offset: u64,
}

/// Does this look like a VMDK: a sparse extent's magic, or a descriptor whose first
/// non-comment, non-blank line is `version=1|2|3` (qemu's `vmdk_probe`)?
pub fn probe(head: &[u8]) -> bool {
    if head.len() >= 4 && (&head[..4] == b"KDMV" || &head[..4] == b"COWD") {
        return true;
    }
    let mut p = 0;
    while p < head.len() {
        match head[p] {
            b'#' => {
                while p < head.len() && head[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < head.len() && head[p] == b' ' {
                    p += 1;
                }
                if p < head.len() && head[p] == b'\r' {
                    p += 1;
                }
                if p == head.len() || head[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &head[p..];
                return [b"1", b"2", b"3"].iter().any(|v| {
                    let line = [&b"version="[..], &v[..]].concat();
                    rest.starts_with(&[&line[..], b"\n"].concat())
                        || rest.starts_with(&[&line[..], b"\r\n"].concat())
                });
            }
        }
    }
    false
}

/// The text up to its first NUL (qemu handles it as a C string).
pub fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The quoted value of `name="..."` (qemu's `vmdk_parse_description`: the first occurrence
/// of the name, two characters skipped, up to the next quote).
pub fn quoted(desc: &str, name: &str) -> Option<String> {
    let at = desc.find(name)? + name.len() + 2;
    let rest = desc.get(at..)?;
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

/// `CID=` (or `parentCID=` with `parent`) as hexadecimal, as qemu's `vmdk_read_cid`.
pub fn cid(desc: &str, parent: bool) -> Option<u32> {
    let name = if parent { "parentCID" } else { "CID" };
    let at = desc.find(name)? + name.len() + 1;
    let rest = desc.get(at..)?.trim_start();
    let rest = rest
        .strip_prefix("0x")
        .or_else(|| rest.strip_prefix("0X"))
        .unwrap_or(rest);
    let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    u32::from_str_radix(&hex, 16).ok()
}

/// The descriptor with its `CID=` line set to `cid` (qemu's `vmdk_write_cid`: the text from
/// `CID=` to `parentCID` is replaced); None when either is missing.
pub fn with_cid(desc: &str, cid: u32) -> Option<String> {
    let parent = desc.find("parentCID")?;
    let at = desc.find("CID")? + "CID".len() + 1;
    if at > parent {
        return None;
    }
    Some(format!("{}{cid:x}\n{}", desc.get(..at)?, &desc[parent..]))
}

/// The extent lines qemu takes: access `RW`, a positive size, a type it knows. Others are
/// skipped as qemu skips them; a FLAT line without its offset (or VMFS with one) is
/// qemu's "Invalid extent line".
pub fn extents(desc: &str) -> Result<Vec<ExtentLine>, String> {
    let mut out = Vec::new();
    for line in desc.split('\n') {
        let Some(f) = fields(line) else { continue };
        if f.access != "RW" {
            continue;
        }
        let invalid = || format!("Invalid extent line: {}", line.trim_end_matches('\r'));
        let offset = match (f.kind.as_str(), f.offset) {
            ("FLAT", Some(o)) if o >= 0 => o as u64,
            ("FLAT", _) => return Err(invalid()),
            ("VMFS", None) => 0,
            ("VMFS", Some(_)) => return Err(invalid()),
            (_, Some(_)) => return Err(invalid()),
            (_, None) => 0,
        };
        let kind = match f.kind.as_str() {
            "FLAT" | "VMFS" => ExtentKind::Flat,
            "SPARSE" | "VMFSSPARSE" => ExtentKind::Sparse,
            "SESPARSE" => return Err("Unsupported extent type 'SESPARSE'".into()),
            _ => continue,
        };
        if f.sectors <= 0 {
            continue;
        }
        out.push(ExtentLine {
            sectors: f.sectors as u64,
            kind,
            file: f.file,
            offset,
        });
    }
    Ok(out)
}

struct Fields {
    access: String,
    sectors: i64,
    kind: String,
    file: String,
    offset: Option<i64>,
}

/// `"%10s %ld %10s \"%511[^\n\r\"]\" %ld"` as sscanf reads it: None when fewer than the
/// first four fields match.
fn fields(line: &str) -> Option<Fields> {
    let mut rest = line;
    let access = word(&mut rest, 10)?;
    let sectors = int(&mut rest)?;
    let kind = word(&mut rest, 10)?;
    rest = rest.trim_start();
    let quoted = rest.strip_prefix('"')?;
    let end = quoted
        .find(['"', '\r', '\n'])
        .filter(|&e| e > 0 && e <= 511)?;
    if !quoted[end..].starts_with('"') {
        return None;
    }
    let file = quoted[..end].to_string();
    rest = &quoted[end + 1..];
    let offset = int(&mut rest);
    Some(Fields {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

/// Up to `max` characters before the next white space (sscanf's `%10s`).
fn word(rest: &mut &str, max: usize) -> Option<String> {
    let s = rest.trim_start();
    let n = s
        .char_indices()
        .take(max + 1)
        .find(|(i, c)| c.is_whitespace() || s[..*i].chars().count() == max)
        .map_or(s.len(), |(i, _)| i);
    if n == 0 {
        return None;
    }
    *rest = &s[n..];
    Some(s[..n].to_string())
}

fn int(rest: &mut &str) -> Option<i64> {
    let s = rest.trim_start();
    let sign = usize::from(s.starts_with(['-', '+']));
    let digits = s[sign..].bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let v = s[..sign + digits].parse::<i64>().ok()?;
    *rest = &s[sign + digits..];
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: &str = "# Disk DescriptorFile\nversion=1\nCID=52b5f2d1\nparentCID=ffffffff\n\
        createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n\
        RW 4194304 FLAT \"t-f001.vmdk\" 0\nRW 2048 FLAT \"t-f002.vmdk\" 0\n\
        RDONLY 8 FLAT \"ro.vmdk\" 0\nRW 8 ZERO\n\n# The Disk Data Base\n#DDB\n\n\
        ddb.virtualHWVersion = \"4\"\n";

    #[test]
    fn probes_magic_and_descriptors() {
        assert!(probe(b"KDMV\x01\0\0\0"));
        assert!(probe(b"# Disk DescriptorFile\nversion=1\nCID=1\n"));
        assert!(probe(b"# c\r\n   \r\nversion=2\r\n"));
        assert!(!probe(b"version=4\n"));
        assert!(!probe(b"x\nversion=1\n"));
        assert!(!probe(&[0u8; 512]));
    }

    #[test]
    fn reads_fields_as_qemu() {
        assert_eq!(quoted(DESC, "createType").unwrap(), "twoGbMaxExtentFlat");
        assert_eq!(cid(DESC, false), Some(0x52b5f2d1));
        assert_eq!(cid(DESC, true), Some(0xffffffff));
        let e = extents(DESC).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].sectors, 4194304);
        assert_eq!(e[1].file, "t-f002.vmdk");
        assert_eq!(e[1].kind, ExtentKind::Flat);
    }

    #[test]
    fn refuses_malformed_extent_lines() {
        let err = extents("RW 8 FLAT \"a.vmdk\"\n").unwrap_err();
        assert_eq!(err, "Invalid extent line: RW 8 FLAT \"a.vmdk\"");
        assert!(extents("RW 8 SPARSE \"a.vmdk\" 7\n").is_err());
        assert!(extents("RW 8 VMFS \"a.vmdk\" 7\n").is_err());
        assert_eq!(
            extents("RW 0 SPARSE \"a.vmdk\"\nRW -1 FLAT \"b\" 0\n").unwrap(),
            vec![]
        );
        assert!(extents("RW 8 SESPARSE \"a.vmdk\"\n").is_err());
    }

    #[test]
    fn hostile_text_is_read_without_panicking() {
        let long = "RWééééééééééééé 8 SPARSE \"a\"\nRW 8 FLATéééééééé \"b\" 0\n";
        assert_eq!(extents(long).unwrap(), vec![]);
        assert_eq!(with_cid("CIDé parentCID=1", 5), None);
        assert_eq!(quoted("createTypeé", "createType"), None);
        assert_eq!(cid("CIDé", false), None);
    }

    #[test]
    fn rewrites_the_cid_only() {
        let d = with_cid(DESC, 0xabc).unwrap();
        assert_eq!(cid(&d, false), Some(0xabc));
        assert_eq!(cid(&d, true), Some(0xffffffff));
        assert!(d.ends_with(&DESC[DESC.find("parentCID").unwrap()..]));
        assert_eq!(with_cid("no ids", 1), None);
    }
}
