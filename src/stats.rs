//! `--stats[=text|json]` and `--stats-file=PATH`: the export's counters (frontends::stats)
//! reported on SIGUSR1 and once at exit, on stderr or appended to the file (a forked
//! server's stderr is /dev/null, so it needs the file).

use frontends::stats::Stats;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct StatsPlan {
    pub json: bool,
    pub file: Option<PathBuf>,
}

/// Reports one export's counters.
#[derive(Clone)]
pub struct Reporter {
    plan: StatsPlan,
    stats: Arc<Stats>,
}

impl Reporter {
    /// Counters for the export `name`, reported at exit from now on.
    pub fn start(plan: StatsPlan, name: &str) -> Reporter {
        let r = Reporter {
            plan,
            stats: Arc::new(Stats::new(name)),
        };
        crate::cleanup::get().stats = Some(r.clone());
        r
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Write a report; `when` says why ("SIGUSR1", "exit").
    pub fn report(&self, when: &str) {
        let snap = self.stats.snapshot();
        let text = if self.plan.json {
            snap.json(when) + "\n"
        } else {
            snap.text(when)
        };
        let written = match &self.plan.file {
            Some(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| f.write_all(text.as_bytes())),
            None => std::io::stderr().lock().write_all(text.as_bytes()),
        };
        if let Err(e) = written {
            tracing::warn!("cannot write the statistics: {e}");
        }
    }
}

/// The plan from `--stats` / `--stats-file`, None when neither is given.
pub fn plan(format: Option<&str>, file: Option<&str>) -> Option<StatsPlan> {
    let json = match format {
        None if file.is_none() => return None,
        None | Some("text") => false,
        Some("json") => true,
        Some(f) => crate::die(format!(
            "Invalid statistics format '{f}' (expected 'text' or 'json')"
        )),
    };
    Some(StatsPlan {
        json,
        file: file.map(PathBuf::from),
    })
}
