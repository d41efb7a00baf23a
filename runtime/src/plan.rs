//! Sharing memory between intermediates whose lifetimes do not overlap.
//!
//! Kernels run in manifest order on one stream, so an intermediate is live
//! from the first kernel that touches it to the last one. Two intermediates
//! whose live ranges are disjoint may use the same memory (a *slot*). The
//! assignment depends only on the kernel order, so it is valid at every value
//! of the runtime dims; only the slot sizes change with the dims (a slot is
//! as large as its largest member at those dims).
//!
//! Slots are chosen greedily in order of first use, best fit by the sizes at
//! the manifest's `point`. Inputs and outputs never share memory.

use crate::manifest::{BufferKind, Manifest, ManifestError, ParamKind};
use std::collections::{BTreeMap, HashMap};

/// Which slot each intermediate uses.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Intermediate name → slot index.
    pub slot_of: HashMap<String, usize>,
    /// Members of each slot, in order of first use.
    pub slots: Vec<Vec<String>>,
}

/// First and last kernel index that touch a buffer (reads it, writes it or
/// is passed its pointer).
fn live_ranges(manifest: &Manifest) -> HashMap<&str, (usize, usize)> {
    let mut ranges: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, kernel) in manifest.kernels.iter().enumerate() {
        let params = kernel.params.iter().filter(|p| p.kind == ParamKind::Buffer).map(|p| &p.name);
        for name in kernel.reads.iter().chain(std::iter::once(&kernel.writes)).chain(params) {
            let range = ranges.entry(name.as_str()).or_insert((i, i));
            range.0 = range.0.min(i);
            range.1 = range.1.max(i);
        }
    }
    ranges
}

impl MemoryPlan {
    /// Plans the intermediates of `manifest`; `share = false` gives every
    /// intermediate its own slot.
    pub fn new(manifest: &Manifest, share: bool) -> Result<Self, ManifestError> {
        let ranges = live_ranges(manifest);
        let mut items: Vec<(&str, (usize, usize), i64)> = Vec::new();
        for buffer in manifest.buffers.iter().filter(|b| b.kind == BufferKind::Intermediate) {
            let range = ranges.get(buffer.name.as_str()).copied().unwrap_or((usize::MAX, usize::MAX));
            let bytes = manifest.eval(&buffer.bytes, &manifest.point)?;
            items.push((&buffer.name, range, bytes));
        }
        items.sort_by_key(|(name, range, _)| (range.0, *name));

        struct Slot {
            last_use: usize,
            bytes: i64,
            members: Vec<String>,
        }
        let mut slots: Vec<Slot> = Vec::new();
        let mut slot_of = HashMap::new();
        for (name, (first, last), bytes) in items {
            // An intermediate no kernel touches gets a slot of its own.
            let unused = first == usize::MAX;
            // Best fit among the free slots: the smallest one that is large
            // enough, else the largest one (it grows).
            let best = (0..slots.len()).filter(|&i| share && !unused && slots[i].last_use < first).min_by_key(|&i| {
                if slots[i].bytes >= bytes {
                    (0, slots[i].bytes)
                } else {
                    (1, -slots[i].bytes)
                }
            });
            let index = match best {
                Some(i) => {
                    let slot = &mut slots[i];
                    slot.last_use = last;
                    slot.bytes = slot.bytes.max(bytes);
                    slot.members.push(name.to_string());
                    i
                }
                None => {
                    slots.push(Slot { last_use: last, bytes, members: vec![name.to_string()] });
                    slots.len() - 1
                }
            };
            slot_of.insert(name.to_string(), index);
        }
        Ok(MemoryPlan { slot_of, slots: slots.into_iter().map(|s| s.members).collect() })
    }

    /// Bytes of each slot at the runtime dims: its largest member.
    pub fn slot_bytes(&self, manifest: &Manifest, dims: &BTreeMap<String, i64>) -> Result<Vec<usize>, ManifestError> {
        let mut sizes = vec![0usize; self.slots.len()];
        for (i, members) in self.slots.iter().enumerate() {
            for name in members {
                let buffer = manifest
                    .buffer(name)
                    .ok_or_else(|| ManifestError::Invalid(format!("memory plan names unknown buffer `{name}`")))?;
                let bytes = manifest.eval(&buffer.bytes, dims)?;
                let bytes = usize::try_from(bytes)
                    .map_err(|_| ManifestError::Invalid(format!("buffer `{name}` has {bytes} bytes at these dims")))?;
                sizes[i] = sizes[i].max(bytes);
            }
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tiny() -> Manifest {
        Manifest::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.manifest.json")).unwrap()
    }

    /// No two members of a slot are live at the same kernel.
    fn assert_disjoint(m: &Manifest, plan: &MemoryPlan) {
        let ranges = live_ranges(m);
        for members in &plan.slots {
            for (i, a) in members.iter().enumerate() {
                for b in &members[i + 1..] {
                    let (ra, rb) = (ranges[a.as_str()], ranges[b.as_str()]);
                    assert!(ra.1 < rb.0 || rb.1 < ra.0, "{a} {ra:?} and {b} {rb:?} share a slot");
                }
            }
        }
    }

    #[test]
    fn shares_only_disjoint_lifetimes() {
        let m = tiny();
        let intermediates = m.buffers.iter().filter(|b| b.kind == BufferKind::Intermediate).count();
        let plan = MemoryPlan::new(&m, true).unwrap();
        assert_eq!(plan.slot_of.len(), intermediates);
        assert!(plan.slots.len() < intermediates / 2, "{} slots for {intermediates}", plan.slots.len());
        assert_disjoint(&m, &plan);
        for (name, &slot) in &plan.slot_of {
            assert!(plan.slots[slot].contains(name));
        }

        let dims = BTreeMap::from([("b".to_string(), 4), ("m_c".to_string(), 100), ("m_d".to_string(), 3)]);
        let shared: usize = plan.slot_bytes(&m, &dims).unwrap().iter().sum();
        let alone = MemoryPlan::new(&m, false).unwrap();
        assert_eq!(alone.slots.len(), intermediates);
        let total: usize = alone.slot_bytes(&m, &dims).unwrap().iter().sum();
        assert!(shared < total, "{shared} vs {total}");
        // Every member fits its slot at any dims.
        let sizes = plan.slot_bytes(&m, &dims).unwrap();
        for (name, &slot) in &plan.slot_of {
            let b = m.buffer(name).unwrap();
            assert!(m.eval(&b.bytes, &dims).unwrap() as usize <= sizes[slot]);
        }
    }
}
