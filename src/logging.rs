//! Where messages go. Three kinds, as in qemu-nbd:
//! - errors worth a user's attention (`tracing::error!`) print as `NAME: message` on stderr,
//!   like qemu's error_report;
//! - trace points (`-T`/`--trace`, qemu's syntax: `[enable=]PATTERN`, `events=FILE`,
//!   `file=FILE`): events named like qemu's (`nbd_trip`, `nbd_negotiate_*`, …) print as
//!   `name message`, to FILE or stderr, as qemu's log trace backend does;
//! - qnbd's own diagnostics: off unless `QNBD_LOG` sets a filter (`QNBD_LOG=debug`), then
//!   with timestamps. `-v` changes none of these: qemu-nbd's `-v` prints nothing more while
//!   serving either.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, EnvFilter, Layer};

/// The trace points qnbd has, for `-T help`.
pub const EVENTS: &[&str] = &[
    "nbd_co_receive_ext_payload_compliance",
    "nbd_co_receive_request_decode_type",
    "nbd_co_receive_request_payload_received",
    "nbd_co_send_chunk_done",
    "nbd_co_send_chunk_error",
    "nbd_co_send_chunk_read",
    "nbd_co_send_chunk_read_hole",
    "nbd_co_send_extents",
    "nbd_co_send_simple_reply",
    "nbd_negotiate_begin",
    "nbd_negotiate_handle_export_name_request",
    "nbd_negotiate_handle_info_block_size",
    "nbd_negotiate_handle_info_request",
    "nbd_negotiate_handle_info_requests",
    "nbd_negotiate_handle_starttls",
    "nbd_negotiate_handle_starttls_handshake",
    "nbd_negotiate_meta_context",
    "nbd_negotiate_meta_query_parse",
    "nbd_negotiate_meta_query_reply",
    "nbd_negotiate_new_style_size_flags",
    "nbd_negotiate_options_check_magic",
    "nbd_negotiate_options_check_option",
    "nbd_negotiate_options_flags",
    "nbd_negotiate_send_info",
    "nbd_negotiate_send_rep_err",
    "nbd_negotiate_send_rep_len",
    "nbd_negotiate_send_rep_list",
    "nbd_negotiate_success",
    "nbd_receive_request",
    "nbd_trip",
];

/// What `-T` asked for.
#[derive(Debug, Default)]
pub struct TraceSpec {
    patterns: Vec<String>,
    file: Option<String>,
    /// `-T help` (or `enable=help`): list the trace points and exit.
    pub help: bool,
    /// qemu's warnings while parsing (whole lines), printed as `-T` is read.
    pub warnings: Vec<String>,
}

impl TraceSpec {
    /// Parse every `-T` as qemu does; the error is qemu's whole line (with its prefix).
    pub fn parse(args: &[String]) -> Result<TraceSpec, String> {
        let mut spec = TraceSpec::default();
        for arg in args {
            let mut items = qnbd::image_opts::split_items(arg);
            // qemu's parser stops at the end of the text: nothing after a last comma (and
            // nothing at all in an empty text) is an item.
            if items.last().is_some_and(|l| l.is_empty()) {
                items.pop();
            }
            for (i, item) in items.iter().enumerate() {
                let (k, v) = match item.split_once('=') {
                    Some((k, v)) => (k, v.to_string()),
                    None if i == 0 => ("enable", item.clone()),
                    // qemu's deprecated short-form boolean: a warning, then `k=on`/`k=off`.
                    None => {
                        let (k, v) = item
                            .strip_prefix("no")
                            .map_or((item.as_str(), "on"), |k| (k, "off"));
                        spec.warnings.push(format!(
                            "{}: warning: short-form boolean option '{item}' deprecated\n\
                             Please use {k}={v} instead",
                            crate::prog::name()
                        ));
                        (k, v.to_string())
                    }
                };
                match k {
                    "enable" if v == "help" => spec.help = true,
                    "enable" => spec.patterns.push(v),
                    "events" => {
                        // qemu names the file as a location: "qemu-nbd:FILE: error".
                        let text = std::fs::read_to_string(&v).map_err(|e| {
                            spec.with_warnings(format!(
                                "{}:{v}: {}",
                                crate::prog::name(),
                                backends::errno_text(&e)
                            ))
                        })?;
                        spec.patterns.extend(
                            text.lines()
                                .map(str::trim)
                                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                                .map(String::from),
                        );
                    }
                    "file" => spec.file = Some(v),
                    _ => {
                        return Err(spec.with_warnings(format!(
                            "{}: Invalid parameter '{k}'",
                            crate::prog::name()
                        )))
                    }
                }
            }
        }
        Ok(spec)
    }

    /// An error message after the warnings printed before it.
    fn with_warnings(&self, err: String) -> String {
        let mut out = String::new();
        for w in &self.warnings {
            out.push_str(w);
            out.push('\n');
        }
        out + &err
    }

    /// The names without a wildcard that are no trace point here (qemu warns of each).
    pub fn unknown_events(&self) -> Vec<&str> {
        self.patterns
            .iter()
            .map(|p| p.strip_prefix('-').unwrap_or(p))
            .filter(|p| !p.contains(['*', '?']) && !EVENTS.contains(p))
            .collect()
    }

    /// qemu's rule: `*` matches any run of characters, a leading `-` disables.
    fn enabled(&self, name: &str) -> bool {
        let mut on = false;
        for p in &self.patterns {
            match p.strip_prefix('-') {
                Some(neg) if glob(neg.as_bytes(), name.as_bytes()) => on = false,
                None if glob(p.as_bytes(), name.as_bytes()) => on = true,
                _ => {}
            }
        }
        on
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// The `message` field of an event.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
}

/// Prints events as `prefix message` (errors) or `name message` (trace points).
struct Lines<W> {
    out: Mutex<W>,
    named: bool,
}

impl<S: Subscriber, W: Write + Send + 'static> Layer<S> for Lines<W> {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut m = Message::default();
        event.record(&mut m);
        let head = if self.named {
            event.metadata().name().to_string()
        } else {
            format!("{}:", crate::prog::name())
        };
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{head} {}", m.0);
        }
    }
}

/// Install the three outputs; the error is qemu's whole line.
pub fn init(trace: &TraceSpec) -> Result<(), String> {
    let trace_out: Box<dyn Write + Send> = match &trace.file {
        Some(f) => Box::new(File::create(f).map_err(|e| {
            format!(
                "{}: Error opening logfile {f}: {}",
                crate::prog::name(),
                backends::errno_text(&e)
            )
        })?),
        None => Box::new(std::io::stderr()),
    };
    let patterns = TraceSpec {
        patterns: trace.patterns.clone(),
        ..Default::default()
    };
    let traces = Lines {
        out: Mutex::new(trace_out),
        named: true,
    }
    .with_filter(filter::filter_fn(move |m| {
        m.is_event() && m.name().starts_with("nbd_") && patterns.enabled(m.name())
    }));
    let diagnostics = std::env::var("QNBD_LOG").ok().map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(EnvFilter::new(f))
    });
    let errors = diagnostics.is_none().then(|| {
        Lines {
            out: Mutex::new(std::io::stderr()),
            named: false,
        }
        .with_filter(filter::LevelFilter::ERROR)
    });
    let quiet = diagnostics.is_none();
    tracing_subscriber::registry()
        .with(traces)
        .with(diagnostics)
        .with(errors)
        .try_init()
        .map_err(|e| e.to_string())?;
    // Crates that log through `log` (ureq, rustls) are bridged into tracing; the bridge took
    // the trace points' level (everything), so each of their trace! calls, several per HTTP
    // answer and per TLS record, went through the subscriber only to be dropped: 75 % of
    // the server's CPU reading a web image (perf). Without QNBD_LOG only their errors can
    // print, so only those are let through.
    if quiet {
        log::set_max_level(log::LevelFilter::Error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_qemu() {
        let s = TraceSpec::parse(&["nbd_*".into(), "-nbd_trip".into()]).unwrap();
        assert!(s.enabled("nbd_negotiate_begin"));
        assert!(!s.enabled("nbd_trip"));
        assert!(!s.enabled("other"));
        let s = TraceSpec::parse(&["enable=nbd_trip,file=/tmp/x".into()]).unwrap();
        assert!(s.enabled("nbd_trip"));
        assert_eq!(s.file.as_deref(), Some("/tmp/x"));
        assert!(TraceSpec::parse(&["help".into()]).unwrap().help);
    }
}
