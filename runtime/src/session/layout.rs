//! What a decode session needs to know about a compiled step: which buffers
//! are the token ids, positions, caches, new K/V rows and logits, found by
//! role / layer / kv in the manifest's buffer table and checked against the
//! single-level decode shapes:
//!
//! | role | shape |
//! |---|---|
//! | `token_ids`, `position` | `[b, n]` |
//! | `context_kv` (per layer, k and v) | `[g, m_c, k]` |
//! | `decode_kv` (per layer, k and v) | `[b, g, m_d, k]` |
//! | output `new_kv` (per layer, k and v) | `[b, g, n, k]` |
//! | output `logits` | `[b, n, vocab]` |
//!
//! `n` is the model constant `n` (1 when absent): 1 for a decode step,
//! more for a prefill step ([`super::Session::fill_context_prefill`]).
//!
//! Shapes are checked by evaluating them at two probe points of the runtime
//! dims, so `[g, m_c, k]` means: the middle axis is `m_c`, the others are the
//! same constants at both points.

use super::SessionError;
use crate::manifest::{Buffer, BufferKind, Manifest};
use std::collections::{BTreeMap, BTreeSet};

/// The buffers of one layer's caches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBuffers {
    pub layer: usize,
    /// KV groups (heads of K/V) and head dim.
    pub g: usize,
    pub k: usize,
    /// Context caches `[g, m_c, k]` (k, v).
    pub context: [String; 2],
    /// Decode caches `[b, g, m_d, k]` (k, v).
    pub decode: [String; 2],
    /// New rows `[b, g, 1, k]` (k, v), outputs of the step.
    pub new: [String; 2],
}

/// The decode-step interface of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeLayout {
    pub token_ids: String,
    pub positions: String,
    pub logits: String,
    pub vocab: usize,
    /// By layer, in layer order.
    pub layers: Vec<LayerBuffers>,
    /// Names of the weight inputs, in table order.
    pub weights: Vec<String>,
    /// `n`: tokens per sample per step (the model constant `n`; 1 for a
    /// decode step, more for a prefill step).
    pub n: usize,
    /// A table of learned positions (GPT-2's `wpe`: the weight a gather
    /// kernel reads with the positions) and its rows: the positions the
    /// model has. `None` where positions are computed (rotary).
    pub position_table: Option<(String, usize)>,
}

/// The runs that fill a context of a prompt's tokens with a prefill step
/// ([`DecodeLayout::prefill_chunks`]), in order: whole chunks, one padded
/// chunk, single steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillChunks {
    /// Tokens in whole chunks of `n` (a multiple of `n`).
    pub whole: usize,
    /// Tokens after them in one more run, padded to `n` (0: none); their
    /// rows and logits are kept, the padding's dropped.
    pub padded: usize,
    /// Tokens after those, stepped one at a time by the decode step.
    pub stepped: usize,
    /// The context the last prefill run reads (its `m_c`; 0 with none):
    /// the step's largest run.
    pub last: usize,
}

/// An axis of an expected shape.
#[derive(Clone, Copy, Debug)]
enum Axis {
    B,
    Mc,
    Md,
    /// The constant `n` (tokens per step).
    New(i64),
    /// Any constant (the same at both probes).
    Const,
}

const RUNTIME_DIMS: [&str; 3] = ["b", "m_c", "m_d"];

fn probes() -> [BTreeMap<String, i64>; 2] {
    let point = |b, mc, md| BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), mc), ("m_d".to_string(), md)]);
    [point(3, 5, 7), point(2, 11, 13)]
}

/// Checks `buffer`'s shape against `pattern`; returns the constants in order.
fn check_shape(
    manifest: &Manifest,
    buffer: &Buffer,
    pattern: &[Axis],
    wanted: &str,
) -> Result<Vec<usize>, SessionError> {
    let bad = |why: String| {
        SessionError::Layout(format!(
            "buffer `{}` (role {}) should have shape {wanted}: {why}",
            buffer.name,
            buffer.role.as_deref().unwrap_or("-")
        ))
    };
    if buffer.shape.len() != pattern.len() {
        return Err(bad(format!("it has {} axes", buffer.shape.len())));
    }
    let mut consts = Vec::new();
    let [p1, p2] = probes();
    for (axis, (size, want)) in buffer.shape.iter().zip(pattern).enumerate() {
        let v1 = manifest.eval(size, &p1).map_err(|e| bad(e.to_string()))?;
        let v2 = manifest.eval(size, &p2).map_err(|e| bad(e.to_string()))?;
        let ok = match want {
            Axis::B => v1 == p1["b"] && v2 == p2["b"],
            Axis::Mc => v1 == p1["m_c"] && v2 == p2["m_c"],
            Axis::Md => v1 == p1["m_d"] && v2 == p2["m_d"],
            Axis::New(n) => v1 == *n && v2 == *n,
            Axis::Const => v1 == v2 && v1 > 0,
        };
        if !ok {
            return Err(bad(format!("axis {axis} is `{size}`")));
        }
        if matches!(want, Axis::Const) {
            consts.push(v1 as usize);
        }
    }
    Ok(consts)
}

impl DecodeLayout {
    /// Reads the decode interface of `manifest`, or says why it is not a
    /// single-level decode step (runtime dims exactly `b`, `m_c`, `m_d`).
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, SessionError> {
        let runtime: BTreeSet<&str> = manifest.dims.runtime.iter().map(String::as_str).collect();
        if runtime != BTreeSet::from(RUNTIME_DIMS) || manifest.dims.runtime.len() != 3 {
            return Err(SessionError::Layout(format!(
                "a decode session needs a single-level graph with runtime dims exactly b, m_c, m_d; this one has {}",
                manifest.dims.runtime.join(", ")
            )));
        }
        use Axis::*;
        let n = manifest.dims.constants.get("n").copied().unwrap_or(1);
        if n < 1 {
            return Err(SessionError::Layout(format!("the model constant n is {n}")));
        }
        let one = New(n);
        let mut token_ids = None;
        let mut positions = None;
        let mut logits = None;
        let mut weights = Vec::new();
        // (layer, kv index) → (name, g, k), per cache kind.
        type Caches = BTreeMap<(usize, usize), (String, usize, usize)>;
        let (mut context, mut decode, mut new): (Caches, Caches, Caches) = Default::default();
        let once = |slot: &mut Option<String>, b: &Buffer| match slot {
            Some(first) => Err(SessionError::Layout(format!(
                "two buffers have role {}: `{first}` and `{}`",
                b.role.as_deref().unwrap_or("-"),
                b.name
            ))),
            None => {
                *slot = Some(b.name.clone());
                Ok(())
            }
        };
        let mut vocab = 0;
        for b in &manifest.buffers {
            let role = b.role.as_deref().unwrap_or("");
            let cache_key = || -> Result<(usize, usize), SessionError> {
                let layer =
                    b.layer.ok_or_else(|| SessionError::Layout(format!("cache buffer `{}` has no layer", b.name)))?;
                let kv = match b.kv.as_deref() {
                    Some("k") => 0,
                    Some("v") => 1,
                    _ => return Err(SessionError::Layout(format!("cache buffer `{}` has no kv (k or v)", b.name))),
                };
                Ok((layer, kv))
            };
            let insert = |map: &mut Caches, consts: Vec<usize>| -> Result<(), SessionError> {
                let key = cache_key()?;
                if let Some((first, _, _)) = map.insert(key, (b.name.clone(), consts[0], consts[1])) {
                    return Err(SessionError::Layout(format!(
                        "layer {} has two {role} {} caches: `{first}` and `{}`",
                        key.0,
                        ["k", "v"][key.1],
                        b.name
                    )));
                }
                Ok(())
            };
            match (b.kind, role) {
                (BufferKind::Input, "token_ids") => {
                    check_shape(manifest, b, &[B, one], "[b, n]")?;
                    once(&mut token_ids, b)?;
                }
                (BufferKind::Input, "position") => {
                    check_shape(manifest, b, &[B, one], "[b, n]")?;
                    once(&mut positions, b)?;
                }
                (BufferKind::Input, "weight") => weights.push(b.name.clone()),
                (BufferKind::Input, "context_kv") => {
                    let c = check_shape(manifest, b, &[Const, Mc, Const], "[g, m_c, k]")?;
                    insert(&mut context, c)?;
                }
                (BufferKind::Input, "decode_kv") => {
                    let c = check_shape(manifest, b, &[B, Const, Md, Const], "[b, g, m_d, k]")?;
                    insert(&mut decode, c)?;
                }
                (BufferKind::Input, other) => {
                    return Err(SessionError::Layout(format!(
                        "input `{}` has role `{other}`; a decode session binds only token ids, positions, weights and KV caches",
                        b.name
                    )))
                }
                (BufferKind::Output, "logits") => {
                    vocab = check_shape(manifest, b, &[B, one, Const], "[b, n, vocab]")?[0];
                    once(&mut logits, b)?;
                }
                (BufferKind::Output, "new_kv") => {
                    let c = check_shape(manifest, b, &[B, Const, one, Const], "[b, g, n, k]")?;
                    insert(&mut new, c)?;
                }
                _ => {}
            }
        }
        let missing = |what: &str| SessionError::Layout(format!("no buffer has role {what}"));
        let token_ids = token_ids.ok_or_else(|| missing("token_ids"))?;
        let positions = positions.ok_or_else(|| missing("position"))?;
        let logits = logits.ok_or_else(|| missing("logits (output)"))?;
        let layer_ids: BTreeSet<usize> =
            context.keys().chain(decode.keys()).chain(new.keys()).map(|(layer, _)| *layer).collect();
        if layer_ids.is_empty() {
            return Err(missing("context_kv"));
        }
        let mut layers = Vec::new();
        for layer in layer_ids {
            let mut names: [[String; 2]; 3] = Default::default();
            let mut gk = None;
            for (which, (map, role)) in
                [(&context, "context_kv"), (&decode, "decode_kv"), (&new, "new_kv")].iter().enumerate()
            {
                for (kv, kv_name) in ["k", "v"].iter().enumerate() {
                    let (name, g, k) = map.get(&(layer, kv)).ok_or_else(|| {
                        SessionError::Layout(format!("layer {layer} has no {role} buffer for {kv_name}"))
                    })?;
                    match gk {
                        None => gk = Some((*g, *k)),
                        Some(first) if first != (*g, *k) => {
                            return Err(SessionError::Layout(format!(
                                "layer {layer}: `{name}` has g={g}, k={k} but the layer's other caches have g={}, k={}",
                                first.0, first.1
                            )))
                        }
                        Some(_) => {}
                    }
                    names[which][kv] = name.clone();
                }
            }
            let [context, decode, new] = names;
            let (g, k) = gk.unwrap_or_default();
            layers.push(LayerBuffers { layer, g, k, context, decode, new });
        }
        let position_table = position_table(manifest, &positions)?;
        Ok(DecodeLayout { token_ids, positions, logits, vocab, layers, weights, n: n as usize, position_table })
    }
}

/// How much of a context a [`super::Session`] holds on the host at once
/// while it installs it ([`DecodeLayout::context_host_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextOnHost {
    /// Every layer's K and V: a context filled from a prompt (built on
    /// the host, then bound), or any context of a session that keeps a
    /// host copy ([`super::Session::keep_host_context`]).
    Whole,
    /// The largest layer's: a random context of a session that keeps no
    /// host copy, drawn and bound a layer at a time.
    OneLayer,
}

/// The largest position a step is given exactly: positions go to it as
/// f32 ([`crate::HostTensor`]), whose integers are exact up to 2^24.
pub const MAX_POSITION: usize = 1 << 24;

impl DecodeLayout {
    /// Bytes a [`super::Session`] holds on the host at once for a context
    /// of `len` tokens, whatever the device the step runs on (see
    /// [`ContextOnHost`]): K and V (`[g, len, k]` each, f32) of every
    /// layer, or of the largest one.
    pub fn context_host_bytes(&self, len: usize, on_host: ContextOnHost) -> usize {
        let layer = |l: &LayerBuffers| l.g.saturating_mul(l.k);
        let per_token = match on_host {
            ContextOnHost::Whole => self.layers.iter().fold(0usize, |t, l| t.saturating_add(layer(l))),
            ContextOnHost::OneLayer => self.layers.iter().map(layer).max().unwrap_or(0),
        };
        per_token.saturating_mul(2 * 4).saturating_mul(len)
    }

    /// How [`super::Session::fill_context_prefill`] runs this prefill step
    /// (`n` new tokens a run) over a prompt of `len` tokens: whole chunks
    /// of `n`, then the rest (fewer than `n`) either as one more run padded
    /// to `n` (when it is at least a quarter of a chunk: a run costs about
    /// what a step does where reading the weights binds, and a few steps
    /// where the tokens' arithmetic does) or stepped one at a time.
    pub fn prefill_chunks(&self, len: usize) -> PrefillChunks {
        let n = self.n.max(1);
        let whole = len / n * n;
        let rest = len - whole;
        let padded = if rest > 0 && rest * 4 >= n { rest } else { 0 };
        let last = if padded > 0 { whole } else { whole.saturating_sub(n) };
        PrefillChunks { whole, padded, stepped: rest - padded, last }
    }

    /// Whether `prefill` (a prefill step's layout) can fill this decode
    /// step's context: the same model (layers, KV groups and head dim of
    /// each, vocabulary). Asked by [`super::Session::fill_context_prefill`],
    /// and by a CLI before it binds the prefill step's weights.
    pub fn check_prefill(&self, prefill: &DecodeLayout) -> Result<(), SessionError> {
        let same = |a: &LayerBuffers, b: &LayerBuffers| (a.layer, a.g, a.k) == (b.layer, b.g, b.k);
        if prefill.vocab != self.vocab
            || prefill.layers.len() != self.layers.len()
            || !prefill.layers.iter().zip(&self.layers).all(|(a, b)| same(a, b))
        {
            return Err(SessionError::Usage(
                "the prefill step is not the same model as the decode step (layers, KV groups, head dim or vocabulary differ)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether the host has room for [`DecodeLayout::context_host_bytes`]
    /// of a context of `len` tokens ([`crate::memory::host_available`]):
    /// asked by a run whose step is on a GPU (on the CPU the copy shares
    /// the step's memory, and is counted with it).
    pub fn check_host_context(&self, len: usize, on_host: ContextOnHost) -> Result<(), crate::memory::Shortfall> {
        let holding = match on_host {
            ContextOnHost::Whole => "every layer's K and V in f32",
            ContextOnHost::OneLayer => "one layer's K and V in f32 at a time",
        };
        crate::memory::check_holding(
            &format!("the host's copy of a context of {len} tokens"),
            holding,
            self.context_host_bytes(len, on_host),
            crate::memory::host_available(),
            "this machine",
        )
    }

    /// The model's last position: its table of learned positions' last
    /// row, else [`MAX_POSITION`] (see [`DecodeLayout::check_positions`]).
    pub fn last_position(&self) -> usize {
        match &self.position_table {
            Some((_, rows)) => rows.saturating_sub(1),
            None => MAX_POSITION,
        }
    }

    /// Whether positions `0..end` are all the model's: past a table of
    /// learned positions ([`DecodeLayout::position_table`]) its gather has
    /// no row to read (and gives NaN), so that is an error naming the
    /// table. Rotary positions have no such end, but every position goes
    /// to the step as an f32 ([`crate::HostTensor`]), exact only up to
    /// [`MAX_POSITION`]: past it a position would be rounded (to an even
    /// one, silently, on a GPU), so that is an error too.
    pub fn check_positions(&self, end: usize) -> Result<(), SessionError> {
        match &self.position_table {
            Some((table, rows)) if end > *rows => Err(SessionError::Usage(format!(
                "{end} positions (context and decoded tokens together) are past the model's {rows} learned \
                 positions (`{table}` has {rows} rows): use at most {rows} tokens in all"
            ))),
            _ if end > MAX_POSITION + 1 => Err(SessionError::Usage(format!(
                "{end} positions (context and decoded tokens together): the last, {}, is past {MAX_POSITION} \
                 (2^24), the largest a step's inputs carry exactly (as f32): use at most {} tokens in all",
                end - 1,
                MAX_POSITION + 1
            ))),
            _ => Ok(()),
        }
    }
}

/// The weight a gather kernel reads with the `positions` input, and its
/// rows (see [`DecodeLayout::position_table`]).
fn position_table(manifest: &Manifest, positions: &str) -> Result<Option<(String, usize)>, SessionError> {
    let gathers = manifest.kernels.iter().filter(|k| k.op == "gather" && k.reads.iter().any(|r| r == positions));
    let tables: BTreeSet<&str> =
        gathers.flat_map(|k| k.reads.iter().map(String::as_str)).filter(|r| *r != positions).collect();
    let Some(&table) = tables.iter().next() else { return Ok(None) };
    let buffer = manifest.buffers.iter().find(|b| b.name == table && b.role.as_deref() == Some("weight"));
    let Some(buffer) = buffer else { return Ok(None) };
    let rows = match buffer.shape.len() {
        2 => check_shape(manifest, buffer, &[Axis::Const, Axis::Const], "[positions, d_model]")?[0],
        _ => return Ok(None),
    };
    Ok(Some((table.to_owned(), rows)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Size;
    use std::path::Path;

    fn tiny() -> Manifest {
        Manifest::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.manifest.json")).unwrap()
    }

    #[test]
    fn reads_the_tiny_model() {
        let layout = DecodeLayout::from_manifest(&tiny()).unwrap();
        assert_eq!(layout.token_ids, "token_ids");
        assert_eq!(layout.positions, "positions");
        assert_eq!(layout.logits, "logits");
        assert_eq!(layout.vocab, 256);
        assert_eq!(layout.layers.len(), 2);
        let l1 = &layout.layers[1];
        assert_eq!((l1.layer, l1.g, l1.k), (1, 2, 16));
        assert_eq!(l1.context, ["cache.1.k_ctx".to_string(), "cache.1.v_ctx".to_string()]);
        assert_eq!(l1.decode, ["cache.1.k_dec".to_string(), "cache.1.v_dec".to_string()]);
        assert_eq!(l1.new, ["layer.1.k_new".to_string(), "layer.1.v_new".to_string()]);
        assert_eq!(layout.weights.len(), 21);
    }

    /// A prompt in prefill chunks: whole chunks, then a rest of at least a
    /// quarter chunk padded to one more, a shorter one stepped.
    #[test]
    fn a_prompt_splits_into_prefill_chunks() {
        let mut layout = DecodeLayout::from_manifest(&tiny()).unwrap();
        let chunks = |whole, padded, stepped, last| PrefillChunks { whole, padded, stepped, last };
        layout.n = 4;
        assert_eq!(layout.prefill_chunks(11), chunks(8, 3, 0, 8));
        assert_eq!(layout.prefill_chunks(9), chunks(8, 1, 0, 8));
        assert_eq!(layout.prefill_chunks(8), chunks(8, 0, 0, 4));
        assert_eq!(layout.prefill_chunks(4), chunks(4, 0, 0, 0));
        assert_eq!(layout.prefill_chunks(3), chunks(0, 3, 0, 0), "none whole: one padded");
        layout.n = 16;
        assert_eq!(layout.prefill_chunks(40), chunks(32, 8, 0, 32));
        assert_eq!(layout.prefill_chunks(36), chunks(32, 4, 0, 32));
        assert_eq!(layout.prefill_chunks(35), chunks(32, 0, 3, 16), "under a quarter chunk: stepped");
        assert_eq!(layout.prefill_chunks(3), chunks(0, 0, 3, 0));
        assert_eq!(layout.prefill_chunks(0), chunks(0, 0, 0, 0));
    }

    /// The host copy of a context: K and V of every layer in f32, or of
    /// one layer where a random context is drawn and bound a layer at a
    /// time.
    #[test]
    fn a_context_on_the_host_takes_k_and_v_of_every_layer_in_f32() {
        use ContextOnHost::{OneLayer, Whole};
        let layout = DecodeLayout::from_manifest(&tiny()).unwrap();
        // 2 layers of 2 KV heads of 16.
        assert_eq!(layout.context_host_bytes(1, Whole), 2 * 2 * (2 * 16) * 4);
        assert_eq!(layout.context_host_bytes(1000, Whole), 1000 * 512);
        assert_eq!(layout.context_host_bytes(1000, OneLayer), 1000 * 256);
        assert_eq!(layout.context_host_bytes(usize::MAX, Whole), usize::MAX, "saturates");
        assert!(layout.check_host_context(1000, Whole).is_ok());
        if crate::memory::host_available().is_some() {
            let err = layout.check_host_context(1 << 50, Whole).unwrap_err().to_string();
            let want = "not enough memory for the host's copy of a context of 1125899906842624 tokens: it needs at \
                        least 576460752.30 GB (every layer's K and V in f32), and this machine has";
            assert!(err.starts_with(want), "{err}");
            let err = layout.check_host_context(1 << 50, OneLayer).unwrap_err().to_string();
            assert!(err.contains("288230376.15 GB (one layer's K and V in f32 at a time)"), "{err}");
        }
    }

    /// A table of learned positions is the weight a gather reads with
    /// the positions (none in the rotary tiny model): positions past its
    /// rows are an error naming it.
    #[test]
    fn finds_a_table_of_learned_positions() {
        let layout = DecodeLayout::from_manifest(&tiny()).unwrap();
        assert_eq!(layout.position_table, None);
        assert!(layout.check_positions(1 << 20).is_ok(), "rotary: no table's end");
        assert!(layout.check_positions(MAX_POSITION + 1).is_ok(), "the last position 2^24 is exact");
        let err = layout.check_positions(MAX_POSITION + 2).unwrap_err().to_string();
        assert!(
            err.contains("the last, 16777217, is past 16777216 (2^24)") && err.contains("16777217 tokens"),
            "{err}"
        );

        let mut m = tiny();
        let mut wpe = m.buffers.iter().find(|b| b.role.as_deref() == Some("weight")).unwrap().clone();
        (wpe.name, wpe.shape) = ("wpe".into(), vec![Size::Int(40), Size::Int(16)]);
        m.buffers.push(wpe);
        let mut gather = m.kernels[0].clone();
        (gather.op, gather.reads) = ("gather".into(), vec!["positions".into(), "wpe".into()]);
        m.kernels.push(gather);
        let layout = DecodeLayout::from_manifest(&m).unwrap();
        assert_eq!(layout.position_table, Some(("wpe".to_string(), 40)));
        assert!(layout.check_positions(40).is_ok());
        let err = layout.check_positions(41).unwrap_err().to_string();
        assert!(err.contains("41 positions") && err.contains("40 learned positions") && err.contains("`wpe`"), "{err}");
    }

    #[test]
    fn rejects_what_is_not_a_single_level_decode_step() {
        let mut m = tiny();
        m.dims.runtime.push("m_s".into());
        let err = DecodeLayout::from_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("m_s"), "{err}");

        let mut m = tiny();
        let i = m.buffers.iter().position(|b| b.name == "cache.0.k_ctx").unwrap();
        m.buffers[i].shape = vec![Size::Expr("b".into()), Size::Expr("m_c".into()), Size::Int(16)];
        let err = DecodeLayout::from_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("cache.0.k_ctx") && err.contains("[g, m_c, k]"), "{err}");

        let mut m = tiny();
        m.buffers.retain(|b| b.name != "layer.1.v_new");
        let err = DecodeLayout::from_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("layer 1") && err.contains("new_kv"), "{err}");

        let mut m = tiny();
        let i = m.buffers.iter().position(|b| b.name == "positions").unwrap();
        m.buffers[i].role = Some("activation".into());
        let err = DecodeLayout::from_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("positions") && err.contains("activation"), "{err}");

        let mut m = tiny();
        let i = m.buffers.iter().position(|b| b.name == "logits").unwrap();
        m.buffers[i].shape[1] = Size::Int(2);
        let err = DecodeLayout::from_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("logits"), "{err}");
    }
}
