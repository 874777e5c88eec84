//! Authorization of a TLS peer's identity (qemu's `authz-simple`, `authz-list`,
//! `authz-listfile`): the certificate DN or PSK username against a policy.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

pub trait Authz: Send + Sync {
    /// Whether `identity` may connect; Err when the policy itself cannot be read.
    fn is_allowed(&self, identity: &str) -> Result<bool, String>;
}

/// `authz-simple,identity=NAME`: exactly one identity.
pub struct Simple {
    pub identity: String,
}

impl Authz for Simple {
    fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        Ok(identity == self.identity)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Allow,
    Deny,
}

impl Policy {
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "allow" => Some(Policy::Allow),
            "deny" => Some(Policy::Deny),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Exact,
    Glob,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "exact" => Some(Format::Exact),
            "glob" => Some(Format::Glob),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: String,
    pub policy: Policy,
    pub format: Format,
}

fn enum_value<T>(
    v: &serde_json::Value,
    name: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: string"))?;
    parse(s).ok_or_else(|| format!("Parameter '{name}' does not accept value '{s}'"))
}

impl Rule {
    fn from_json(v: &serde_json::Value, i: usize) -> Result<Rule, String> {
        let at = |k: &str| format!("rules[{i}].{k}");
        let obj = v
            .as_object()
            .ok_or_else(|| format!("Invalid parameter type for 'rules[{i}]', expected: object"))?;
        let mut pattern = None;
        let mut policy = None;
        let mut format = Format::Exact;
        for (k, val) in obj {
            match k.as_str() {
                "match" => {
                    pattern = Some(
                        val.as_str()
                            .ok_or_else(|| {
                                format!(
                                    "Invalid parameter type for '{}', expected: string",
                                    at("match")
                                )
                            })?
                            .to_string(),
                    )
                }
                "policy" => policy = Some(enum_value(val, &at("policy"), Policy::parse)?),
                "format" => format = enum_value(val, &at("format"), Format::parse)?,
                other => return Err(format!("Parameter '{}' is unexpected", at(other))),
            }
        }
        let pattern = pattern.ok_or_else(|| format!("Parameter '{}' is missing", at("match")))?;
        let policy = policy.ok_or_else(|| format!("Parameter '{}' is missing", at("policy")))?;
        Ok(Rule {
            pattern,
            policy,
            format,
        })
    }
}

/// `authz-list`: the first rule that matches decides, else the default policy.
#[derive(Clone, Debug)]
pub struct List {
    pub policy: Policy,
    pub rules: Vec<Rule>,
}

impl List {
    /// `{"policy": "allow"|"deny", "rules": [{"match": M, "policy": P, "format": F}]}` with
    /// qemu's (QAPI's) messages for what is wrong.
    pub fn from_json(v: &serde_json::Value) -> Result<List, String> {
        let obj = v
            .as_object()
            .ok_or("Invalid parameter type, expected: object")?;
        let mut policy = Policy::Deny;
        let mut rules = Vec::new();
        for (k, val) in obj {
            match k.as_str() {
                "policy" => policy = enum_value(val, "policy", Policy::parse)?,
                "rules" => {
                    let arr = val
                        .as_array()
                        .ok_or("Invalid parameter type for 'rules', expected: array".to_string())?;
                    for (i, r) in arr.iter().enumerate() {
                        rules.push(Rule::from_json(r, i)?);
                    }
                }
                // The id and type are the caller's business when this came from --object.
                "qom-type" | "id" => {}
                other => return Err(format!("Parameter '{other}' is unexpected")),
            }
        }
        Ok(List { policy, rules })
    }

    fn decide(&self, identity: &str) -> bool {
        let policy = self
            .rules
            .iter()
            .find(|r| match r.format {
                Format::Exact => r.pattern == identity,
                Format::Glob => glob_match(r.pattern.as_bytes(), identity.as_bytes()),
            })
            .map(|r| r.policy)
            .unwrap_or(self.policy);
        policy == Policy::Allow
    }
}

impl Authz for List {
    fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        Ok(self.decide(identity))
    }
}

/// `authz-listfile,filename=F[,refresh=on]`: an `authz-list` kept in a JSON file, read again
/// when it changes if `refresh` is on.
pub struct ListFile {
    path: PathBuf,
    refresh: bool,
    current: Mutex<(List, Option<SystemTime>)>,
}

impl ListFile {
    pub fn new(path: PathBuf, refresh: bool) -> Result<ListFile, String> {
        let (list, mtime) = Self::load(&path)?;
        Ok(ListFile {
            path,
            refresh,
            current: Mutex::new((list, mtime)),
        })
    }

    fn load(path: &PathBuf) -> Result<(List, Option<SystemTime>), String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "Unable to read {}: {}",
                path.display(),
                backends::errno_text(&e)
            )
        })?;
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: JSON parse error, {e}", path.display()))?;
        let list = List::from_json(&json).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((list, mtime))
    }
}

impl Authz for ListFile {
    fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        let mut cur = match self.current.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if self.refresh {
            let mtime = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if mtime != cur.1 {
                *cur = Self::load(&self.path)?;
            }
        }
        Ok(cur.0.decide(identity))
    }
}

/// fnmatch(3) with no flags: `*`, `?`, `[...]` (with `!`/`^` and ranges), `\` escapes.
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&p[pi..], s[si]) {
                        if matched {
                            pi += next;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == s[si] => {
                    pi += 2;
                    si += 1;
                    continue;
                }
                b'\\' if pi + 1 < p.len() => {}
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Match `c` against the bracket expression at the start of `p`; returns (matched, length
/// of the expression), or None if the bracket is not closed (then it is a literal `[`).
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &lo = p.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = p[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("CN=*", "CN=laptop.example.com"));
        assert!(m("*CN=laptop*", "C=GB,O=Example,CN=laptop.example.com"));
        assert!(!m("CN=*.org", "CN=a.com"));
        assert!(m("a?c", "abc"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("[", "["));
    }

    #[test]
    fn first_matching_rule_decides() {
        let l = List {
            policy: Policy::Deny,
            rules: vec![
                Rule {
                    pattern: "CN=bad*".into(),
                    policy: Policy::Deny,
                    format: Format::Glob,
                },
                Rule {
                    pattern: "CN=*".into(),
                    policy: Policy::Allow,
                    format: Format::Glob,
                },
            ],
        };
        assert!(l.decide("CN=good"));
        assert!(!l.decide("CN=badguy"));
        assert!(!l.decide("O=x"));
    }
}
