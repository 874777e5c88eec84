//! `--stats`: per-export counters kept by the frontends while they serve — requests, bytes,
//! errors and a latency histogram per command, and the connections — and their reports, as
//! text or as one JSON object.
//!
//! Everything is a relaxed atomic: workers of every connection record at once without a
//! lock, and a report is a snapshot that may be a request or two behind the others (the
//! counts of one command are read together, never torn within one field).
//!
//! Latency is the time from a request's header being read to its reply being sent. The
//! histogram has 16 exact buckets below 16 ns, then 8 per power of two, so a percentile
//! is exact to within 1/8 (12.5 %) of its value; `max` and `mean` are exact.

use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What a request asked for, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
    /// Requests of a type the server does not know.
    Other,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Cache,
        Op::BlockStatus,
        Op::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block-status",
            Op::Other => "other",
        }
    }
}

const EXACT: usize = 16;
const SUB: usize = 8;
const BUCKETS: usize = EXACT + (64 - 4) * SUB;

fn bucket(ns: u64) -> usize {
    if ns < EXACT as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros() as usize; // >= 4
    let sub = (ns >> (exp - 3)) as usize & (SUB - 1);
    EXACT + (exp - 4) * SUB + sub
}

/// The largest latency (ns) that falls in bucket `i`.
fn bucket_top(i: usize) -> u64 {
    if i < EXACT {
        return i as u64;
    }
    let exp = (i - EXACT) / SUB + 4;
    let sub = ((i - EXACT) % SUB) as u64;
    // The top bucket's bound is 2^64: compute in u128 and clamp.
    let top = (u128::from(SUB as u64 + sub + 1) << (exp - 3)) - 1;
    u64::try_from(top).unwrap_or(u64::MAX)
}

struct Histogram {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }

    fn record(&self, ns: u64) {
        self.buckets[bucket(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }
}

struct OpStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// The counters of one export.
pub struct Stats {
    export: String,
    started: Instant,
    ops: [OpStats; Op::ALL.len()],
    accepted: AtomicU64,
    open: AtomicU64,
    negotiated: AtomicU64,
    failed: AtomicU64,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("export", &self.export)
            .finish()
    }
}

/// A connection's lifetime in the counters: opened when made, closed when dropped.
pub struct ConnectionGuard<'a>(&'a Stats);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

impl Stats {
    pub fn new(export: &str) -> Stats {
        Stats {
            export: export.to_string(),
            started: Instant::now(),
            ops: std::array::from_fn(|_| OpStats {
                requests: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                latency: Histogram::new(),
            }),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            negotiated: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn op(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    /// A request answered after `took`; `bytes` is the length it named.
    pub fn request(&self, op: Op, bytes: u64, took: Duration) {
        let s = self.op(op);
        s.requests.fetch_add(1, Relaxed);
        s.bytes.fetch_add(bytes, Relaxed);
        s.latency
            .record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }

    /// A request answered with an error.
    pub fn error(&self, op: Op) {
        self.op(op).errors.fetch_add(1, Relaxed);
    }

    pub fn connection(&self) -> ConnectionGuard<'_> {
        self.accepted.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        ConnectionGuard(self)
    }

    /// The connection reached the transmission phase.
    pub fn negotiated(&self) {
        self.negotiated.fetch_add(1, Relaxed);
    }

    /// The connection's negotiation failed.
    pub fn negotiation_failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            export: self.export.clone(),
            elapsed: self.started.elapsed(),
            connections: Connections {
                accepted: self.accepted.load(Relaxed),
                open: self.open.load(Relaxed),
                negotiated: self.negotiated.load(Relaxed),
                failed: self.failed.load(Relaxed),
            },
            ops: Op::ALL
                .iter()
                .map(|&op| (op, self.op(op).snapshot()))
                .collect(),
        }
    }
}

impl OpStats {
    fn snapshot(&self) -> OpSnapshot {
        let h = &self.latency;
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let n: u64 = counts.iter().sum();
        let pct = |p: f64| -> u64 {
            if n == 0 {
                return 0;
            }
            let rank = ((p * n as f64).ceil() as u64).clamp(1, n);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_top(i);
                }
            }
            0
        };
        let max_ns = h.max_ns.load(Relaxed);
        OpSnapshot {
            requests: self.requests.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            mean_ns: h.sum_ns.load(Relaxed).checked_div(n).unwrap_or(0),
            // A bucket's top can exceed the largest value seen in it.
            p50_ns: pct(0.50).min(max_ns),
            p90_ns: pct(0.90).min(max_ns),
            p99_ns: pct(0.99).min(max_ns),
            p999_ns: pct(0.999).min(max_ns),
            max_ns,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connections {
    pub accepted: u64,
    pub open: u64,
    pub negotiated: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub export: String,
    pub elapsed: Duration,
    pub connections: Connections,
    pub ops: Vec<(Op, OpSnapshot)>,
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

impl Snapshot {
    /// A table for people; commands never requested are left out.
    pub fn text(&self, when: &str) -> String {
        let mut s = String::new();
        let c = &self.connections;
        let _ = writeln!(
            s,
            "statistics for export '{}' ({when}, after {:.3} s)",
            self.export,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "connections: {} accepted, {} open, {} negotiated, {} failed",
            c.accepted, c.open, c.negotiated, c.failed
        );
        let _ = writeln!(
            s,
            "{:<13}{:>10}{:>14}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "command",
            "requests",
            "bytes",
            "errors",
            "mean us",
            "p50 us",
            "p90 us",
            "p99 us",
            "p99.9 us",
            "max us"
        );
        for (op, o) in self.ops.iter().filter(|(_, o)| o.requests > 0) {
            let _ = writeln!(
                s,
                "{:<13}{:>10}{:>14}{:>8}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                op.name(),
                o.requests,
                o.bytes,
                o.errors,
                us(o.mean_ns),
                us(o.p50_ns),
                us(o.p90_ns),
                us(o.p99_ns),
                us(o.p999_ns),
                us(o.max_ns)
            );
        }
        s
    }

    /// One JSON object on one line (a file of reports is JSON Lines); every command appears.
    pub fn json(&self, when: &str) -> String {
        let c = &self.connections;
        let mut ops = Map::new();
        for (op, o) in &self.ops {
            ops.insert(
                op.name().into(),
                json!({
                    "requests": o.requests,
                    "bytes": o.bytes,
                    "errors": o.errors,
                    "latency-us": {
                        "mean": us(o.mean_ns),
                        "p50": us(o.p50_ns),
                        "p90": us(o.p90_ns),
                        "p99": us(o.p99_ns),
                        "p99.9": us(o.p999_ns),
                        "max": us(o.max_ns),
                    },
                }),
            );
        }
        let doc = json!({
            "export": self.export,
            "when": when,
            "elapsed-seconds": self.elapsed.as_secs_f64(),
            "connections": {
                "accepted": c.accepted,
                "open": c.open,
                "negotiated": c.negotiated,
                "failed": c.failed,
            },
            "commands": Value::Object(ops),
        });
        doc.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket(v);
            assert!(b < BUCKETS);
            assert!(b >= last || v > 100_000, "monotonic at {v}");
            last = b;
            assert!(bucket_top(b) >= v, "top of bucket {b} below {v}");
            if b > 0 {
                assert!(bucket_top(b - 1) < v, "{v} belongs to an earlier bucket");
            }
        }
    }

    #[test]
    fn percentiles_are_within_an_eighth() {
        let s = Stats::new("e");
        for i in 1..=1000u64 {
            s.request(Op::Read, 4096, Duration::from_micros(i));
        }
        s.error(Op::Read);
        let snap = s.snapshot();
        let (_, r) = &snap.ops[0];
        assert_eq!((r.requests, r.bytes, r.errors), (1000, 4_096_000, 1));
        assert_eq!(r.max_ns, 1_000_000);
        assert_eq!(r.mean_ns, 500_500);
        for (p, want) in [
            (r.p50_ns, 500_000),
            (r.p90_ns, 900_000),
            (r.p99_ns, 990_000),
        ] {
            assert!(p >= want && p <= want + want / 8, "{p} vs {want}");
        }
        let j: Value = serde_json::from_str(&snap.json("exit")).unwrap();
        assert_eq!(j["commands"]["read"]["requests"], 1000);
        assert_eq!(j["commands"]["write"]["requests"], 0);
        assert!(snap.text("exit").contains("\nread "));
    }

    #[test]
    fn connections_count_open_and_closed() {
        let s = Stats::new("");
        {
            let _a = s.connection();
            let _b = s.connection();
            s.negotiated();
            s.negotiation_failed();
            assert_eq!(s.snapshot().connections.open, 2);
        }
        let c = s.snapshot().connections;
        assert_eq!((c.accepted, c.open, c.negotiated, c.failed), (2, 0, 1, 1));
    }
}
