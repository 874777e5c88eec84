//! `--object`: qemu's user-creatable objects that qemu-nbd uses, in both of qemu's syntaxes
//! (`type,id=ID,key=value` with `,,` escaping and dotted keys, or a JSON object), with
//! qemu's messages. Objects are created in command-line order, as qemu does, so a secret must
//! come before the credentials that use it.

use backends::format::Secret;
use base64::Engine as _;
use frontends::tls::anon::AnonCreds;
use frontends::tls::authz::{self, Authz};
use frontends::tls::psk::{PskCreds, PskOptions};
use frontends::tls::x509::{X509Creds, X509Options};
use frontends::tls::{Creds, Endpoint, Versions};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use zeroize::Zeroizing;

pub enum Object {
    /// Zeroed when dropped, never printed.
    Secret(Secret),
    Creds(Creds),
    Authz(Arc<dyn Authz>),
}

#[derive(Default)]
pub struct Objects {
    list: Vec<(String, Object)>,
}

/// Types qnbd creates, with the properties each takes (for `TYPE,help` and the key check).
/// qemu's id_wellformed: a letter, then letters, digits, `-`, `.` or `_`.
fn is_identifier(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

const TYPES: &[(&str, &[(&str, &str)])] = &[
    (
        "authz-list",
        &[("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule")],
    ),
    (
        "authz-listfile",
        &[("filename", "string"), ("refresh", "bool")],
    ),
    ("authz-simple", &[("identity", "string")]),
    (
        "secret",
        &[
            ("data", "string"),
            ("file", "string"),
            ("format", "QCryptoSecretFormat"),
            ("iv", "string"),
            ("keyid", "string"),
        ],
    ),
    (
        "tls-creds-anon",
        &[
            ("dir", "string"),
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("priority", "string"),
            ("verify-peer", "bool"),
        ],
    ),
    (
        "tls-creds-psk",
        &[
            ("dir", "string"),
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("priority", "string"),
            ("username", "string"),
            ("verify-peer", "bool"),
        ],
    ),
    (
        "tls-creds-x509",
        &[
            ("dir", "string"),
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("passwordid", "string"),
            ("priority", "string"),
            ("sanity-check", "bool"),
            ("verify-peer", "bool"),
        ],
    ),
];

/// What `--object help` and `--object TYPE,help` print; None when the argument is no help
/// request.
pub fn help(arg: &str) -> Option<String> {
    if arg == "help" || arg == "?" {
        let mut s = String::from("List of user creatable objects:\n");
        for (t, _) in TYPES {
            s.push_str(&format!("  {t}\n"));
        }
        return Some(s);
    }
    // As qemu's keyval parser: a bare `help` (or `?`) anywhere after the type asks for
    // help, unless an earlier item is malformed (then that error is the answer).
    let mut ty: Option<String> = None;
    let mut wanted = false;
    for (i, item) in crate::image_opts::split_items(arg).into_iter().enumerate() {
        match item.split_once('=') {
            Some(("qom-type", v)) => ty = Some(v.to_string()),
            Some(_) => {}
            None if i == 0 => ty = Some(item),
            None if item == "help" || item == "?" => wanted = true,
            None => return None,
        }
    }
    if !wanted {
        return None;
    }
    let Some((ty, props)) = TYPES.iter().find(|(t, _)| Some(*t) == ty.as_deref()) else {
        // An unknown (or missing) type: the list of types.
        return help("help");
    };
    let mut s = format!("{ty} options:\n");
    for (k, v) in *props {
        s.push_str(&format!("  {k}=<{v}>\n"));
    }
    Some(s)
}

/// Where a value came from decides how it is read: keyval strings are converted ("on" is
/// a bool), JSON values must already have the right type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Keyval,
    Json,
}

/// Most components of a dotted key. Nesting is recursive here (and in qemu, whose qemu-nbd
/// dies of a stack overflow on a key some 60,000 deep): a deeper key is refused.
const MAX_KEY_DEPTH: usize = 64;

/// Split `type,a=b,c.0.d=e` (`,,` is a comma) into a JSON object, dotted keys nested and
/// numeric components turned into arrays, as qemu's keyval parser does.
fn parse_keyval(s: &str) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    for (i, it) in crate::image_opts::split_items(s).into_iter().enumerate() {
        let (k, v) = match it.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            // The first item may leave out its key: it is the type.
            None if i == 0 => ("qom-type".to_string(), it.clone()),
            None => return Err(format!("Expected '=' after parameter '{it}'")),
        };
        if k.is_empty() {
            return Err(format!("Invalid parameter '{it}'"));
        }
        let parts: Vec<&str> = k.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("Invalid parameter '{k}'"));
        }
        if parts.len() > MAX_KEY_DEPTH {
            return Err(format!("Parameter '{k}' is nested too deeply"));
        }
        let mut node = &mut root;
        for p in &parts[..parts.len() - 1] {
            let entry = node
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            node = match entry {
                Value::Object(m) => m,
                _ => return Err(format!("Parameter '{k}' conflicts with '{p}'")),
            };
        }
        let last = parts[parts.len() - 1].to_string();
        if node.contains_key(&last) {
            return Err(format!("Parameter '{k}' is set more than once"));
        }
        node.insert(last, Value::String(v));
    }
    Ok(arrays(Value::Object(root))
        .as_object()
        .cloned()
        .unwrap_or_default())
}

/// Objects whose keys are all 0..n become arrays.
fn arrays(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut idx: Vec<usize> = Vec::new();
            let numeric = !m.is_empty()
                && m.keys().all(|k| match k.parse::<usize>() {
                    Ok(n) => {
                        idx.push(n);
                        true
                    }
                    Err(_) => false,
                });
            if numeric {
                idx.sort_unstable();
                if idx.iter().enumerate().all(|(i, &n)| i == n) {
                    let mut out = vec![Value::Null; idx.len()];
                    for (k, val) in m {
                        if let Ok(n) = k.parse::<usize>() {
                            out[n] = arrays(val);
                        }
                    }
                    return Value::Array(out);
                }
            }
            Value::Object(m.into_iter().map(|(k, v)| (k, arrays(v))).collect())
        }
        other => other,
    }
}

/// The properties of one object, consumed as they are read so leftovers can be refused.
struct Props {
    map: Map<String, Value>,
    syntax: Syntax,
}

impl Props {
    fn str(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!(
                "Invalid parameter type for '{key}', expected: string"
            )),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) if self.syntax == Syntax::Json => Ok(Some(b)),
            Some(Value::String(s)) if self.syntax == Syntax::Keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
            },
            Some(_) => Err(format!(
                "Invalid parameter type for '{key}', expected: boolean"
            )),
        }
    }

    fn choice<T>(&mut self, key: &str, parse: fn(&str) -> Option<T>) -> Result<Option<T>, String> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => parse(&s)
                .map(Some)
                .ok_or_else(|| format!("Parameter '{key}' does not accept value '{s}'")),
        }
    }

    fn finish(&self) -> Result<(), String> {
        match self.map.keys().next() {
            Some(k) => Err(format!("Parameter '{k}' is unexpected")),
            None => Ok(()),
        }
    }
}

impl Objects {
    /// Create the objects of every `--object`, in order.
    pub fn create(args: &[String]) -> Result<Objects, String> {
        let mut objects = Objects::default();
        for a in args {
            objects.add(a)?;
        }
        Ok(objects)
    }

    fn add(&mut self, arg: &str) -> Result<(), String> {
        let (map, syntax) = if arg.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(arg).map_err(|e| {
                if e.is_eof() {
                    "JSON parse error, premature EOI".to_string()
                } else {
                    format!("JSON parse error, {e}")
                }
            })?;
            match v {
                Value::Object(m) => (m, Syntax::Json),
                _ => return Err("Invalid parameter type, expected: object".into()),
            }
        } else {
            (parse_keyval(arg)?, Syntax::Keyval)
        };
        let mut p = Props { map, syntax };
        let ty = p
            .str("qom-type")?
            .ok_or("Parameter 'qom-type' is missing")?;
        if !TYPES.iter().any(|(t, _)| *t == ty) {
            return Err(format!("Parameter 'qom-type' does not accept value '{ty}'"));
        }
        let id = p.str("id")?.ok_or("Parameter 'id' is missing")?;
        if !is_identifier(&id) {
            return Err("Parameter 'id' expects an identifier\n\
                 Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
                .into());
        }
        if self.list.iter().any(|(i, _)| *i == id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let obj = match ty.as_str() {
            "secret" => Object::Secret(self.make_secret(&mut p)?),
            "tls-creds-x509" => Object::Creds(self.x509(&mut p)?),
            "tls-creds-psk" => Object::Creds(psk(&mut p)?),
            "tls-creds-anon" => Object::Creds(anon(&mut p)?),
            "authz-simple" => {
                let identity = p.str("identity")?;
                let identity = identity.ok_or("Parameter 'identity' is missing")?;
                Object::Authz(Arc::new(authz::Simple { identity }))
            }
            "authz-list" => {
                // The list's own checks use the JSON form; keyval strings were already
                // nested into the same shape.
                let list = authz::List::from_json(&Value::Object(std::mem::take(&mut p.map)))?;
                Object::Authz(Arc::new(list))
            }
            "authz-listfile" => {
                let file = p
                    .str("filename")?
                    .ok_or("Parameter 'filename' is missing")?;
                let refresh = p.bool("refresh")?.unwrap_or(true);
                p.finish()?;
                Object::Authz(Arc::new(authz::ListFile::new(file.into(), refresh)?))
            }
            _ => unreachable!("types were checked against TYPES"),
        };
        p.finish()?;
        self.list.push((id, obj));
        Ok(())
    }

    fn get(&self, id: &str) -> Option<&Object> {
        self.list.iter().find(|(i, _)| i == id).map(|(_, o)| o)
    }

    /// The secret `id` (`key-secret=` of an encrypted image), None when there is none.
    pub fn secret(&self, id: &str) -> Option<Secret> {
        match self.get(id) {
            Some(Object::Secret(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The secret `id` as text (qemu's `qcrypto_secret_lookup_as_utf8`: a password, a
    /// cookie).
    pub fn secret_text(&self, id: &str) -> Result<String, String> {
        let bytes = self.secret_bytes(id)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("Data from secret {id} is not valid UTF-8"))
    }

    fn secret_bytes(&self, id: &str) -> Result<&[u8], String> {
        match self.get(id) {
            Some(Object::Secret(s)) => Ok(s.bytes()),
            _ => Err(format!("No secret with id '{id}'")),
        }
    }

    fn make_secret(&self, p: &mut Props) -> Result<Secret, String> {
        let data = p.str("data")?;
        let file = p.str("file")?;
        let base64 = p
            .choice("format", |s| match s {
                "raw" => Some(false),
                "base64" => Some(true),
                _ => None,
            })?
            .unwrap_or(false);
        let keyid = p.str("keyid")?;
        let iv = p.str("iv")?;
        p.finish()?;
        // Every intermediate copy of the secret is zeroed when dropped.
        let mut bytes = Zeroizing::new(match (data, file) {
            (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
            (Some(d), None) => d.into_bytes(),
            (None, Some(f)) => std::fs::read(&f).map_err(|e| {
                format!(
                    "Unable to read {f}: Failed to open file “{f}”: {}",
                    backends::errno_text(&e)
                )
            })?,
        });
        let b64 = |what: &str, s: &[u8]| {
            base64::engine::general_purpose::STANDARD
                .decode(s.trim_ascii())
                .map(Zeroizing::new)
                .map_err(|e| format!("Unable to decode {what}: {e}"))
        };
        if let Some(k) = keyid {
            // An encrypted secret: base64 AES-256-CBC ciphertext under another secret.
            let key = self.secret_bytes(&k)?;
            if key.len() != 32 {
                return Err("Key should be 32 bytes in length".into());
            }
            let iv = iv.ok_or("IV is required to decrypt secret")?;
            let iv = b64("the IV", iv.as_bytes())?;
            if iv.len() != 16 {
                return Err(format!("IV should be 16 bytes in length not {}", iv.len()));
            }
            let ct = b64("the secret", &bytes)?;
            bytes =
                openssl::symm::decrypt(openssl::symm::Cipher::aes_256_cbc(), key, Some(&iv), &ct)
                    .map(Zeroizing::new)
                    .map_err(|e| format!("Unable to decrypt secret: {e}"))?;
        } else if iv.is_some() {
            return Err("'iv' requires 'keyid'".into());
        }
        if base64 {
            bytes = b64("the secret", &bytes)?;
        }
        Ok(Secret::new(std::mem::take(&mut *bytes)))
    }

    fn x509(&self, p: &mut Props) -> Result<Creds, String> {
        let common = CredsCommon::read(p)?;
        let (dir, versions) = common.dir_and_versions()?;
        let (endpoint, verify_peer) = (common.endpoint, common.verify_peer);
        let sanity_check = p.bool("sanity-check")?.unwrap_or(true);
        let key_password = match p.str("passwordid")? {
            Some(id) => Some(self.secret_bytes(&id)?.to_vec()),
            None => None,
        };
        p.finish()?;
        let o = X509Options {
            dir,
            endpoint,
            verify_peer,
            key_password,
            versions,
            sanity_check,
        };
        X509Creds::load(&o)
            .map(Creds::X509)
            .map_err(|e| e.to_string())
    }

    /// `--tls-creds=ID` for a role (`endpoint`), with qemu's messages.
    pub fn tls_creds(&self, id: &str, want: Endpoint) -> Result<Creds, String> {
        let c = match self.get(id) {
            None => return Err(format!("No TLS credentials with id '{id}'")),
            Some(Object::Creds(c)) => c,
            Some(_) => return Err(format!("Object with id '{id}' is not TLS credentials")),
        };
        if c.endpoint() != want {
            return Err(format!(
                "Expected TLS credentials for a {} endpoint",
                want.name()
            ));
        }
        Ok(c.clone())
    }

    /// `--tls-authz=ID`; None when no authz object has that id (refused per client, as qemu).
    pub fn authz(&self, id: &str) -> Option<Arc<dyn Authz>> {
        match self.get(id) {
            Some(Object::Authz(a)) => Some(a.clone()),
            _ => None,
        }
    }
}

/// The properties every TLS credentials type shares.
struct CredsCommon {
    endpoint: Endpoint,
    verify_peer: bool,
    priority: Option<String>,
    dir: Option<String>,
}

impl CredsCommon {
    fn read(p: &mut Props) -> Result<CredsCommon, String> {
        Ok(CredsCommon {
            endpoint: p
                .choice("endpoint", Endpoint::parse)?
                .unwrap_or(Endpoint::Client),
            verify_peer: p.bool("verify-peer")?.unwrap_or(true),
            priority: p.str("priority")?,
            dir: p.str("dir")?,
        })
    }

    /// `dir=`, which x509 and PSK credentials need, and the versions `priority=` allows.
    fn dir_and_versions(&self) -> Result<(PathBuf, Versions), String> {
        let dir = self.dir.clone().ok_or("Missing 'dir' property value")?;
        let versions =
            Versions::from_priority(self.priority.as_deref()).map_err(|e| e.to_string())?;
        Ok((dir.into(), versions))
    }
}

fn psk(p: &mut Props) -> Result<Creds, String> {
    let common = CredsCommon::read(p)?;
    let (dir, versions) = common.dir_and_versions()?;
    let endpoint = common.endpoint;
    let username = p.str("username")?;
    p.finish()?;
    let o = PskOptions {
        dir,
        endpoint,
        username,
        versions,
    };
    PskCreds::load(&o)
        .map(Creds::Psk)
        .map_err(|e| e.to_string())
}

fn anon(p: &mut Props) -> Result<Creds, String> {
    // Anonymous TLS is TLS 1.2 only and authenticates nobody: the priority and
    // verify-peer are accepted as qemu accepts them.
    let common = CredsCommon::read(p)?;
    p.finish()?;
    AnonCreds::load(common.dir.map(PathBuf::from), common.endpoint)
        .map(Creds::Anon)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(arg: &str) -> String {
        match Objects::create(&[arg.to_string()]) {
            Ok(_) => panic!("{arg} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn keyval_nests_dotted_keys_into_arrays() {
        let m = parse_keyval("authz-list,id=a,rules.0.match=CN=x,,y,rules.0.policy=allow").unwrap();
        assert_eq!(m["qom-type"], "authz-list");
        assert_eq!(m["rules"][0]["match"], "CN=x,y");
        assert_eq!(m["rules"][0]["policy"], "allow");
    }

    #[test]
    fn empty_and_deep_keys_are_refused_not_recursed_into() {
        assert_eq!(
            err("authz-list,id=a,rules..a=1"),
            "Invalid parameter 'rules..a'"
        );
        let deep = format!("rules.{}", vec!["0"; 60_000].join("."));
        let e = err(&format!("authz-list,id=a,{deep}=1"));
        assert!(
            e.ends_with("is nested too deeply"),
            "{}",
            &e[e.len() - 40..]
        );
        // Within the limit: qemu's type error.
        let ok_depth = format!("rules.{}", vec!["a"; 60].join("."));
        assert_eq!(
            err(&format!("authz-list,id=a,{ok_depth}=1")),
            "Invalid parameter type for 'rules', expected: array"
        );
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(
            err("foo,id=x"),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(err("authz-simple,identity=x"), "Parameter 'id' is missing");
        assert_eq!(err("authz-simple,id=a"), "Parameter 'identity' is missing");
        assert_eq!(
            err("authz-simple,id=a,identity=x,junk"),
            "Expected '=' after parameter 'junk'"
        );
        assert_eq!(
            err("authz-simple,id=a,identity=x,bogus=1"),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err("secret,id=s"),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            err("secret,id=s,data=x,file=y"),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            err("secret,id=s,data=x,format=hex"),
            "Parameter 'format' does not accept value 'hex'"
        );
        assert_eq!(
            err("tls-creds-x509,id=t,endpoint=server"),
            "Missing 'dir' property value"
        );
        assert_eq!(
            err("tls-creds-x509,id=t,endpoint=sideways,dir=x"),
            "Parameter 'endpoint' does not accept value 'sideways'"
        );
        assert_eq!(
            err("tls-creds-x509,id=t,dir=x,verify-peer=maybe"),
            "Parameter 'verify-peer' expects 'on' or 'off'"
        );
        assert_eq!(
            err(r#"{"qom-type":"tls-creds-x509","id":"t","dir":"d","verify-peer":"on"}"#),
            "Invalid parameter type for 'verify-peer', expected: boolean"
        );
        assert_eq!(
            err(r#"{"qom-type":"authz-list","id":"a","rules":[{"policy":"allow"}]}"#),
            "Parameter 'rules[0].match' is missing"
        );
        assert_eq!(
            err("authz-list,id=a,rules=x"),
            "Invalid parameter type for 'rules', expected: array"
        );
        assert!(err(r#"{"qom-type":"secret""#).starts_with("JSON parse error"));
    }

    #[test]
    fn secrets_decode_and_decrypt() {
        let key = [7u8; 32];
        let iv = [9u8; 16];
        let ct = openssl::symm::encrypt(
            openssl::symm::Cipher::aes_256_cbc(),
            &key,
            Some(&iv),
            b"hunter2",
        )
        .unwrap();
        let e = base64::engine::general_purpose::STANDARD;
        let args = vec![
            format!("secret,id=k,data={},format=base64", e.encode(key)),
            format!(
                "secret,id=s,data={},keyid=k,iv={}",
                e.encode(&ct),
                e.encode(iv)
            ),
            "secret,id=b,data=aGVsbG8=,format=base64".to_string(),
        ];
        let o = Objects::create(&args).unwrap();
        assert_eq!(o.secret_bytes("s").unwrap(), b"hunter2");
        assert_eq!(o.secret_bytes("b").unwrap(), b"hello");
        let dup = vec![args[2].clone(), args[2].clone()];
        assert_eq!(
            Objects::create(&dup).err().unwrap(),
            "attempt to add duplicate property 'b' to object (type 'container')"
        );
    }
}
