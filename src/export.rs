//! The NBD export served by `serve.rs` and `connect.rs`: the opened device with the plan's
//! name, description, meta contexts and, with `--stats`, its counters.

use crate::plan::ExportPlan;
use crate::stats::Reporter;
use backends::Device;
use frontends::nbd::server::Export;

/// The export, and the reporter SIGUSR1 prints (the cleanup record prints it at exit).
pub fn build(
    plan: ExportPlan,
    device: Device,
    multi_conn: bool,
    bitmaps: &[String],
) -> (Export, Option<Reporter>) {
    let reporter = plan.stats.map(|p| Reporter::start(p, &plan.name));
    let mut export = Export::new(
        plan.name,
        plan.description,
        device,
        multi_conn,
        plan.allocation_depth,
    )
    .with_bitmaps(plan.allocation_depth, bitmaps);
    if let Some(r) = &reporter {
        export = export.with_stats(r.stats());
    }
    (export, reporter)
}
