//! Deterministic random inputs for a manifest's buffers, by role: the scheme
//! of the compiler's reference interpreter (`src/interp/random.rs`), so a
//! weight drawn here equals the interpreter's for the same seed and name.
//!
//! - `weight`, rank >= 2: `U[-1, 1) / sqrt(last dim)`; rank 1: `1 + 0.1 U`
//!   (norm gains), or `0.1 U` when the name contains `bias`; rank 0: `U`.
//! - `activation`, `context_kv`, `decode_kv`: `U[-1, 1)`.
//! - `token_ids`: integers below the row count of the table that the first
//!   `gather` kernel reading them indexes (`0..2` when none does).
//! - `position`: element `(.., j)` is `m_c + m_d + j` (the absolute position
//!   of new token `j`; a dim that is not a runtime dim counts as 0).
//! - any other integer buffer: `0..2`.
//!
//! Each buffer draws from its own stream (`seed ^ fnv1a(name)`).

use crate::dtype::DType;
use crate::manifest::{Buffer, Manifest, ManifestError};
use crate::rng::SplitMix64;
use crate::HostTensor;
use std::collections::BTreeMap;

/// A buffer's shape at the runtime dims, as sizes.
pub fn shape_at(
    manifest: &Manifest,
    buffer: &Buffer,
    dims: &BTreeMap<String, i64>,
) -> Result<Vec<usize>, ManifestError> {
    buffer
        .shape
        .iter()
        .map(|size| {
            let v = manifest.eval(size, dims)?;
            usize::try_from(v).map_err(|_| {
                ManifestError::Invalid(format!("buffer `{}` has a negative size {v} at {dims:?}", buffer.name))
            })
        })
        .collect()
}

/// Random contents for `buffer` at `dims` (see the module docs).
pub fn random_tensor(
    manifest: &Manifest,
    buffer: &Buffer,
    dims: &BTreeMap<String, i64>,
    seed: u64,
) -> Result<HostTensor, ManifestError> {
    random_tensor_in(manifest, buffer, dims, seed, Vec::new())
}

/// [`random_tensor`], its values drawn into `spare`'s memory where they
/// fit: binding a model's weights one after another reuses one buffer
/// rather than mapping fresh pages in for each.
pub fn random_tensor_in(
    manifest: &Manifest,
    buffer: &Buffer,
    dims: &BTreeMap<String, i64>,
    seed: u64,
    spare: Vec<f32>,
) -> Result<HostTensor, ManifestError> {
    let shape = shape_at(manifest, buffer, dims)?;
    let mut rng = SplitMix64::named(seed, &buffer.name);
    let n: usize = shape.iter().product();
    let last = shape.last().copied().unwrap_or(1).max(1);
    let is_float = DType::parse(&buffer.dtype).map(DType::is_float).unwrap_or(true);
    let role = buffer.role.as_deref().unwrap_or("");
    let data: Vec<f32> = match role {
        "token_ids" => {
            let rows = gather_rows(manifest, &buffer.name, dims)?.unwrap_or(2) as u64;
            (0..n).map(|_| rng.below(rows) as f32).collect()
        }
        "position" => {
            let dim = |d: &str| {
                if manifest.dims.runtime.iter().any(|r| r == d) {
                    dims.get(d).copied().unwrap_or(0)
                } else {
                    0
                }
            };
            let base = dim("m_s") + dim("m_c") + dim("m_d");
            (0..n).map(|i| (base + (i % last) as i64) as f32).collect()
        }
        _ if !is_float => (0..n).map(|_| rng.below(2) as f32).collect(),
        "weight" if shape.len() >= 2 => {
            let scale = (last as f32).sqrt();
            draws_into(&rng, n, |r| r.symmetric() / scale, spare)
        }
        "weight" if shape.len() == 1 && buffer.name.contains("bias") => (0..n).map(|_| 0.1 * rng.symmetric()).collect(),
        "weight" if shape.len() == 1 => (0..n).map(|_| 1.0 + 0.1 * rng.symmetric()).collect(),
        _ => draws_into(&rng, n, SplitMix64::symmetric, spare),
    };
    Ok(HostTensor { shape, data })
}

/// Values drawn below which one thread draws them all.
const PARALLEL_DRAWS: usize = 1 << 20;

/// `n` values `draw(rng)` one draw each, from `rng` on: split across the
/// cores for a large tensor (each part's generator jumped ahead to its
/// first draw), the same values as drawn one after another. The
/// compiler's reference interpreter draws its large inputs with it too.
pub fn draws(rng: &SplitMix64, n: usize, draw: impl Fn(&mut SplitMix64) -> f32 + Sync) -> Vec<f32> {
    draws_into(rng, n, draw, Vec::new())
}

/// [`draws`] into `spare`'s memory where they fit.
fn draws_into(rng: &SplitMix64, n: usize, draw: impl Fn(&mut SplitMix64) -> f32 + Sync, spare: Vec<f32>) -> Vec<f32> {
    // Every element is drawn below.
    let mut out = sized(spare, n);
    crate::parallel::fill_parts(&mut out, 1, PARALLEL_DRAWS, |first, part| {
        let mut r = rng.jumped(first as u64);
        part.iter_mut().for_each(|v| *v = draw(&mut r));
    });
    out
}

/// `n` elements in `spare`'s memory (more where it has too little): its
/// own values where they fit, zeros past them, for a caller that
/// overwrites every element (zeroing them first would be a pass over the
/// whole, on one thread).
pub(crate) fn sized(mut spare: Vec<f32>, n: usize) -> Vec<f32> {
    spare.truncate(n);
    spare.resize(n, 0.0);
    spare
}

/// Rows of the table indexed by the first `gather` kernel that reads `ids`.
fn gather_rows(manifest: &Manifest, ids: &str, dims: &BTreeMap<String, i64>) -> Result<Option<usize>, ManifestError> {
    let Some(kernel) = manifest.kernels.iter().find(|k| k.op == "gather" && k.reads.iter().any(|r| r == ids)) else {
        return Ok(None);
    };
    let Some(table) = kernel.reads.iter().filter(|r| *r != ids).find_map(|r| manifest.buffer(r)) else {
        return Ok(None);
    };
    Ok(shape_at(manifest, table, dims)?.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tiny() -> Manifest {
        Manifest::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.manifest.json")).unwrap()
    }

    #[test]
    fn draws_split_across_threads_equal_drawing_in_one() {
        let rng = SplitMix64::named(3, "w");
        let n = 3 * PARALLEL_DRAWS + 17;
        let mut one = rng.clone();
        let want: Vec<f32> = (0..n).map(|_| one.symmetric()).collect();
        assert_eq!(draws(&rng, n, SplitMix64::symmetric), want);
        assert_eq!(draws(&rng, 5, SplitMix64::symmetric), want[..5]);
        assert!(draws(&rng, 0, SplitMix64::symmetric).is_empty());
        let mut ahead = rng.clone();
        (0..1000).for_each(|_| {
            ahead.next_u64();
        });
        assert_eq!(rng.jumped(1000).next_u64(), ahead.next_u64());
    }

    #[test]
    fn draws_by_role() {
        let m = tiny();
        let dims = BTreeMap::from([("b".into(), 3), ("m_c".into(), 5), ("m_d".into(), 2)]);
        let get = |name: &str| random_tensor(&m, m.buffer(name).unwrap(), &dims, 7).unwrap();
        let ids = get("token_ids");
        assert_eq!(ids.shape, vec![3, 1]);
        assert!(ids.data.iter().all(|v| v.fract() == 0.0 && (0.0..256.0).contains(v)));
        assert_eq!(get("positions").data, vec![7.0, 7.0, 7.0]);
        let norm = get("model.norm.weight");
        assert!(norm.data.iter().all(|v| (0.9..=1.1).contains(v)));
        let q = get("model.layers.0.self_attn.q_proj.weight");
        assert!(q.data.iter().all(|v| v.abs() <= 1.0 / 8.0));
        let ctx = get("cache.0.k_ctx");
        assert_eq!(ctx.shape, vec![2, 5, 16]);
        assert_eq!(get("cache.0.k_ctx"), ctx, "deterministic");
        assert_ne!(random_tensor(&m, m.buffer("cache.0.k_ctx").unwrap(), &dims, 8).unwrap(), ctx);
    }
}
