//! Metadata contexts an export offers, and how LIST/SET queries select them (qemu's rules:
//! a LIST query ending in ':' is a namespace wildcard, SET selects exact names only).

use crate::nbd::proto::{CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION};

/// What a context reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContextKind {
    BaseAllocation,
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` for `-B NAME`.
    DirtyBitmap(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// The per-connection id sent in REP_META_CONTEXT and BLOCK_STATUS chunks.
    pub id: u32,
    pub name: String,
    pub kind: ContextKind,
}

/// The contexts one export offers, in qemu's order (bitmaps last, the last `-B` first).
pub fn available(allocation_depth: bool, bitmaps: &[String]) -> Vec<MetaContext> {
    let mut v = vec![MetaContext {
        id: 0,
        name: CONTEXT_BASE_ALLOCATION.into(),
        kind: ContextKind::BaseAllocation,
    }];
    if allocation_depth {
        v.push(MetaContext {
            id: 1,
            name: CONTEXT_ALLOCATION_DEPTH.into(),
            kind: ContextKind::AllocationDepth,
        });
    }
    for name in bitmaps.iter().rev() {
        v.push(MetaContext {
            id: v.len() as u32,
            name: format!("qemu:dirty-bitmap:{name}"),
            kind: ContextKind::DirtyBitmap(name.clone()),
        });
    }
    v
}

/// Contexts a LIST query matches.
pub fn list_matches<'a>(all: &'a [MetaContext], query: &str) -> Vec<&'a MetaContext> {
    all.iter()
        .filter(|c| {
            c.name == query
                || (query.ends_with(':')
                    && c.name.starts_with(query)
                    && (query.matches(':').count() == 1 || query == "qemu:dirty-bitmap:"))
        })
        .collect()
}

/// The context a SET query selects, if any.
pub fn set_match<'a>(all: &'a [MetaContext], query: &str) -> Option<&'a MetaContext> {
    all.iter().find(|c| c.name == query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_match_as_qemu_does() {
        let all = available(true, &["b0".to_string(), "b1".to_string()]);
        let names = |q: &str| {
            list_matches(&all, q)
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("base:"), vec!["base:allocation"]);
        assert_eq!(
            names("qemu:"),
            vec![
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b1",
                "qemu:dirty-bitmap:b0"
            ]
        );
        assert_eq!(
            names("qemu:dirty-bitmap:"),
            vec!["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"]
        );
        assert_eq!(
            names("qemu:allocation-depth"),
            vec!["qemu:allocation-depth"]
        );
        assert!(names("foo:bar").is_empty());
        assert!(names("nocolon").is_empty());
        assert!(names("base:alloc").is_empty());
        assert!(set_match(&all, "base:").is_none());
        assert_eq!(set_match(&all, "base:allocation").map(|c| c.id), Some(0));
    }
}
