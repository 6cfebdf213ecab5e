//! An inverted index over the known workload identities: (label key, value) → the
//! identities carrying it. "Which workloads does this selector select?" is asked for
//! every rule (widening) and every target (exact selectors); scanning all identities
//! each time would make synthesis quadratic in the number of workloads.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::OnceLock;

use bulkhead_model::{Identity, LabelSelector, Labels, SelectorRequirement};

use crate::input::{IdentityInfo, IdentityKind};

/// Workload identities with a posting list per label pair.
#[derive(Debug)]
pub struct LabelIndex<'a> {
    workloads: Vec<&'a IdentityInfo>,
    by_id: HashMap<Identity, &'a IdentityInfo>,
    /// (key, value) → indexes into `workloads`, ascending.
    postings: HashMap<(&'a str, &'a str), Vec<u32>>,
    /// Identity → position in `workloads`.
    position: HashMap<Identity, usize>,
    /// Each workload's exact selector, computed on first use (shared by threads).
    exact: Vec<OnceLock<LabelSelector>>,
}

impl<'a> LabelIndex<'a> {
    pub fn new(identities: &'a [IdentityInfo]) -> Self {
        let mut workloads: Vec<&IdentityInfo> =
            identities.iter().filter(|i| i.kind == IdentityKind::Workload && !i.id.is_reserved()).collect();
        workloads.sort_by_key(|i| i.id);
        workloads.dedup_by_key(|i| i.id);
        let mut postings: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
        for (n, w) in workloads.iter().enumerate() {
            for pair in w.labels.iter() {
                postings.entry(pair).or_default().push(n as u32);
            }
        }
        let by_id = identities.iter().map(|i| (i.id, i)).collect();
        let position = workloads.iter().enumerate().map(|(n, w)| (w.id, n)).collect();
        let exact = workloads.iter().map(|_| OnceLock::new()).collect();
        Self { workloads, by_id, postings, position, exact }
    }

    pub fn get(&self, id: Identity) -> Option<&'a IdentityInfo> {
        self.by_id.get(&id).copied()
    }

    pub fn is_workload(&self, id: Identity) -> bool {
        self.get(id).is_some_and(|i| i.kind == IdentityKind::Workload && !id.is_reserved())
    }

    pub fn workloads(&self) -> &[&'a IdentityInfo] {
        &self.workloads
    }

    /// How many workloads carry `key=value`.
    pub fn pair_count(&self, key: &str, value: &str) -> usize {
        self.postings.get(&(key, value)).map_or(0, Vec::len)
    }

    /// Calls `f` for every workload `selector` selects, in identity order, until `f`
    /// breaks.
    pub fn try_for_each_selected<B>(
        &self,
        selector: &LabelSelector,
        mut f: impl FnMut(&'a IdentityInfo) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        // Narrow down through the rarest matchLabels pair, then check the rest.
        let rarest = selector
            .match_labels
            .iter()
            .map(|(k, v)| self.postings.get(&(k.as_str(), v.as_str())).map_or(&[][..], Vec::as_slice))
            .min_by_key(|p| p.len());
        let mut visit =
            |w: &'a IdentityInfo| if selector.matches(&w.labels) { f(w) } else { ControlFlow::Continue(()) };
        match rarest {
            Some(candidates) => candidates.iter().try_for_each(|&n| visit(self.workloads[n as usize])),
            None => self.workloads.iter().try_for_each(|w| visit(w)),
        }
    }

    /// Calls `f` for every workload `selector` selects, in identity order.
    pub fn for_each_selected(&self, selector: &LabelSelector, mut f: impl FnMut(&'a IdentityInfo)) {
        let _: ControlFlow<()> = self.try_for_each_selected(selector, |w| {
            f(w);
            ControlFlow::Continue(())
        });
    }

    /// Whether the workloads carrying all `pairs` are exactly `want` (sorted).
    pub fn pairs_select_exactly(&self, pairs: &[(&str, &str)], want: &[Identity]) -> bool {
        let Some(rarest) =
            pairs.iter().map(|p| self.postings.get(p).map_or(&[][..], Vec::as_slice)).min_by_key(|p| p.len())
        else {
            return self.workloads.len() == want.len();
        };
        if rarest.len() < want.len() {
            return false;
        }
        let mut found = 0usize;
        for &n in rarest {
            let w = self.workloads[n as usize];
            if pairs.iter().all(|(k, v)| w.labels.get(k) == Some(*v)) {
                if want.binary_search(&w.id).is_err() {
                    return false;
                }
                found += 1;
            }
        }
        found == want.len()
    }

    /// Whether `selector` selects exactly `want` (sorted). Stops at the first workload
    /// outside `want`: a broad selector (`tier=web`) is refuted in a few steps instead
    /// of walking thousands of matches.
    pub fn selects_exactly(&self, selector: &LabelSelector, want: &[Identity]) -> bool {
        let mut found = 0usize;
        let flow = self.try_for_each_selected(selector, |w| {
            if want.binary_search(&w.id).is_ok() {
                found += 1;
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        });
        flow.is_continue() && found == want.len()
    }

    /// The selected workloads' identities, ascending.
    pub fn select(&self, selector: &LabelSelector) -> Vec<Identity> {
        let mut out = Vec::new();
        self.for_each_selected(selector, |w| out.push(w.id));
        out
    }

    /// The exact selector of workload `id` (see [`Self::exact_selector`]), computed once.
    pub fn exact_selector_of(&self, id: Identity) -> Option<&LabelSelector> {
        let n = *self.position.get(&id)?;
        Some(self.exact[n].get_or_init(|| self.exact_selector(&self.workloads[n].labels)))
    }

    /// A selector that selects exactly the workload with `labels` and nothing else
    /// known: all its labels, plus `DoesNotExist` for a key of every known workload
    /// whose labels are a strict superset (which `matchLabels` alone would also select).
    pub fn exact_selector(&self, labels: &Labels) -> LabelSelector {
        let mut sel = LabelSelector::with_labels(labels.iter());
        let mut excluded: Vec<String> = Vec::new();
        let mut supersets: Vec<&IdentityInfo> = Vec::new();
        self.for_each_selected(&sel, |w| {
            if w.labels.len() > labels.len() {
                supersets.push(w);
            }
        });
        for w in supersets {
            if excluded.iter().any(|k| w.labels.get(k).is_some()) {
                continue;
            }
            // Its first key the target lacks: deterministic, and one is enough.
            if let Some((k, _)) = w.labels.iter().find(|(k, _)| labels.get(k).is_none()) {
                excluded.push(k.to_owned());
            }
        }
        sel.match_expressions = excluded.into_iter().map(SelectorRequirement::does_not_exist).collect();
        sel.normalize();
        sel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u32, pairs: &[(&str, &str)]) -> IdentityInfo {
        IdentityInfo::workload(Identity(id), format!("w{id}"), Labels::new(pairs.iter().copied()).expect("labels"))
    }

    #[test]
    fn exact_selector_excludes_supersets() {
        let ids = vec![
            info(256, &[("app", "web")]),
            info(257, &[("app", "web"), ("track", "canary")]),
            info(258, &[("app", "web"), ("track", "canary"), ("zone", "a")]),
            info(259, &[("app", "db")]),
        ];
        let idx = LabelIndex::new(&ids);
        let sel = idx.exact_selector(&ids[0].labels);
        assert_eq!(idx.select(&sel), vec![Identity(256)]);
        assert_eq!(sel.match_expressions.len(), 1, "one DoesNotExist covers both supersets: {sel}");
        for i in &ids {
            assert_eq!(idx.select(&idx.exact_selector(&i.labels)), vec![i.id]);
        }
    }

    #[test]
    fn select_uses_all_terms() {
        let ids = vec![info(256, &[("a", "1"), ("b", "1")]), info(257, &[("a", "1"), ("b", "2")])];
        let idx = LabelIndex::new(&ids);
        assert_eq!(idx.select(&LabelSelector::with_labels([("a", "1")])), vec![Identity(256), Identity(257)]);
        assert_eq!(idx.select(&LabelSelector::with_labels([("a", "1"), ("b", "2")])), vec![Identity(257)]);
        assert_eq!(idx.select(&LabelSelector::with_labels([("c", "1")])), Vec::<Identity>::new());
        assert_eq!(idx.select(&LabelSelector::default()).len(), 2);
    }
}
