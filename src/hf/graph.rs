//! The decode-step graph of a [`Spec`] as a model.json document, written the
//! way the Hugging Face modeling code computes it. Keys are in the order
//! [`crate::export::to_json`] writes them, so the document round-trips.

use super::{Act, Family, Spec};
use serde_json::{json, Map, Value as Json};

/// The batch axis, total key length (context, decoded, new tokens) and mask
/// offset of a single-level graph: one context shared by all `b` samples.
const SINGLE: Layout = Layout { batch: "b", keys: "m_c+m_d+n", offset: "m_c+m_d", multi: false };

/// The same for multi-level sharing: `P` prompts of `S` samples each share a
/// system prompt (`m_s`), each prompt's samples share its context (`m_c`).
/// Sizes are written in canonical order, so the document round-trips.
const MULTI: Layout = Layout { batch: "P*S", keys: "m_c+m_d+m_s+n", offset: "m_c+m_d+m_s", multi: true };

/// Sizes that differ between single- and multi-level sharing.
#[derive(Clone, Copy)]
struct Layout {
    /// Size of the batch axis of activations and decode caches.
    batch: &'static str,
    /// Keys one new token attends to.
    keys: &'static str,
    /// Position of the first new token.
    offset: &'static str,
    /// System cache broadcast over all samples, per-prompt cache broadcast
    /// over its group of samples.
    multi: bool,
}

/// A size: an integer becomes a JSON number, an expression stays a string.
fn size(d: &str) -> Json {
    match d.parse::<i64>() {
        Ok(v) => json!(v),
        Err(_) => json!(d),
    }
}

fn shape(dims: &[&str]) -> Json {
    Json::Array(dims.iter().map(|d| size(d)).collect())
}

/// Collects inputs, nodes and outputs in emission order.
struct Builder {
    dtype: &'static str,
    layout: Layout,
    inputs: Vec<Json>,
    nodes: Vec<Json>,
    outputs: Vec<Json>,
}

impl Builder {
    fn input(&mut self, name: &str, role: &str, kv: Option<(usize, &str)>, dims: &[&str], dtype: &str) {
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        m.insert("role".into(), json!(role));
        if let Some((layer, kv)) = kv {
            m.insert("layer".into(), json!(layer));
            m.insert("kv".into(), json!(kv));
        }
        m.insert("shape".into(), shape(dims));
        m.insert("dtype".into(), json!(dtype));
        self.inputs.push(Json::Object(m));
    }

    /// Declares a weight and returns its name.
    fn weight(&mut self, name: String, dims: &[&str]) -> String {
        let dtype = self.dtype;
        self.input(&name, "weight", None, dims, dtype);
        name
    }

    /// Appends a node and returns its id.
    fn node(&mut self, id: String, op: &str, inputs: &[&str], attrs: Option<Json>) -> String {
        let mut m = Map::new();
        m.insert("id".into(), json!(id));
        m.insert("op".into(), json!(op));
        m.insert("inputs".into(), json!(inputs));
        if let Some(a) = attrs {
            m.insert("attrs".into(), a);
        }
        m.insert("dtype".into(), json!(self.dtype));
        self.nodes.push(Json::Object(m));
        id
    }

    fn output(&mut self, name: String, node: &str, role: &str, kv: Option<(usize, &str)>) {
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        m.insert("node".into(), json!(node));
        m.insert("role".into(), json!(role));
        if let Some((layer, kv)) = kv {
            m.insert("layer".into(), json!(layer));
            m.insert("kv".into(), json!(kv));
        }
        self.outputs.push(Json::Object(m));
    }

    /// A projection with parameters `{param}.weight` (and `{param}.bias`):
    /// `nn.Linear` stores `[out, in]` (matmul with `transpose_b`), GPT-2's
    /// `Conv1D` stores `[in, out]` (plain matmul).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        x: &str,
        param: &str,
        id: &str,
        dim_in: &str,
        dim_out: &str,
        conv1d: bool,
        bias: bool,
    ) -> String {
        let (w, attrs) = if conv1d {
            (self.weight(format!("{param}.weight"), &[dim_in, dim_out]), None)
        } else {
            (self.weight(format!("{param}.weight"), &[dim_out, dim_in]), Some(json!({"transpose_b": true})))
        };
        let y = self.node(id.to_string(), "matmul", &[x, &w], attrs);
        if !bias {
            return y;
        }
        let b = self.weight(format!("{param}.bias"), &[dim_out]);
        self.node(format!("{id}_bias"), "add", &[&y, &b], None)
    }

    /// `[b, n, heads*k]` → reshape `[b, n, heads, k]` (`{pre}_split`) →
    /// transpose `[b, heads, n, k]` (`id`); `k` is `head` here.
    fn split_heads(&mut self, x: &str, pre: &str, id: &str, heads: &str, head: &str) -> String {
        let split = self.node(
            format!("{pre}_split"),
            "reshape",
            &[x],
            Some(json!({"shape": shape(&[self.layout.batch, "n", heads, head])})),
        );
        self.node(id.to_string(), "transpose", &[&split], Some(json!({"perm": [0, 2, 1, 3]})))
    }

    /// The cache inputs of layer `i`: context (`{kv}_ctx`) and decode
    /// (`{kv}_dec`) caches, and with multi-level sharing first the system
    /// caches (`{kv}_sys`); the per-prompt context cache then has a `P` axis.
    fn caches(&mut self, i: usize) {
        let dtype = self.dtype;
        let batch = self.layout.batch;
        if self.layout.multi {
            for kv in ["k", "v"] {
                self.input(&format!("cache.{i}.{kv}_sys"), "context_kv", Some((i, kv)), &["g", "m_s", "k"], dtype);
            }
            for kv in ["k", "v"] {
                self.input(&format!("cache.{i}.{kv}_ctx"), "context_kv", Some((i, kv)), &["P", "g", "m_c", "k"], dtype);
            }
        } else {
            for kv in ["k", "v"] {
                self.input(&format!("cache.{i}.{kv}_ctx"), "context_kv", Some((i, kv)), &["g", "m_c", "k"], dtype);
            }
        }
        for kv in ["k", "v"] {
            self.input(&format!("cache.{i}.{kv}_dec"), "decode_kv", Some((i, kv)), &[batch, "g", "m_d", "k"], dtype);
        }
    }

    /// All keys (or values) of layer `i` for every query head:
    /// `concat([broadcast(ctx), dec, new], 2)`, then `repeat_kv` when `g < h`.
    /// With multi-level sharing: `concat([broadcast(sys), ctx per sample,
    /// dec, new], 2)`, where the per-prompt cache is repeated over its `S`
    /// samples the way a framework does it (`ctx[:, None].expand(P, S, ..)
    /// .reshape(P*S, ..)`).
    fn kv_all(&mut self, s: &Spec, i: usize, kv: &str, new: &str) -> String {
        let l = format!("l{i}.attn.{kv}");
        let Layout { batch, keys, .. } = self.layout;
        let dec = format!("cache.{i}.{kv}_dec");
        let parts = if self.layout.multi {
            let sys = self.node(
                format!("{l}_sys_b"),
                "broadcast",
                &[&format!("cache.{i}.{kv}_sys")],
                Some(json!({"shape": shape(&[batch, "g", "m_s", "k"])})),
            );
            let grouped = self.node(
                format!("{l}_ctx_grouped"),
                "reshape",
                &[&format!("cache.{i}.{kv}_ctx")],
                Some(json!({"shape": shape(&["P", "1", "g", "m_c", "k"])})),
            );
            let expanded = self.node(
                format!("{l}_ctx_expanded"),
                "broadcast",
                &[&grouped],
                Some(json!({"shape": shape(&["P", "S", "g", "m_c", "k"])})),
            );
            let ctx = self.node(
                format!("{l}_ctx_b"),
                "reshape",
                &[&expanded],
                Some(json!({"shape": shape(&[batch, "g", "m_c", "k"])})),
            );
            vec![sys, ctx]
        } else {
            vec![self.node(
                format!("{l}_ctx_b"),
                "broadcast",
                &[&format!("cache.{i}.{kv}_ctx")],
                Some(json!({"shape": shape(&[batch, "g", "m_c", "k"])})),
            )]
        };
        let mut inputs: Vec<&str> = parts.iter().map(String::as_str).collect();
        inputs.extend([dec.as_str(), new]);
        let all = self.node(format!("{l}_all"), "concat", &inputs, Some(json!({"axis": 2})));
        if s.g == s.h {
            return all;
        }
        if s.g == 1 {
            return self.node(
                format!("{l}_rep"),
                "broadcast",
                &[&all],
                Some(json!({"shape": shape(&[batch, "h", keys, "k"])})),
            );
        }
        // HF repeat_kv: x[:, :, None].expand(b, g, p, M, k).reshape(b, h, M, k).
        let grouped = self.node(
            format!("{l}_grouped"),
            "reshape",
            &[&all],
            Some(json!({"shape": shape(&[batch, "g", "1", keys, "k"])})),
        );
        let expanded = self.node(
            format!("{l}_expanded"),
            "broadcast",
            &[&grouped],
            Some(json!({"shape": shape(&[batch, "g", "p", keys, "k"])})),
        );
        self.node(format!("{l}_rep"), "reshape", &[&expanded], Some(json!({"shape": shape(&[batch, "h", keys, "k"])})))
    }

    /// Attention of layer `i` from `q [b, h, n, k]` and the new rows
    /// `[b, g, n, k]`; returns the merged heads `[b, n, h*k]` and records the
    /// new rows as outputs.
    fn attention(&mut self, s: &Spec, i: usize, q: &str, k_new: &str, v_new: &str) -> String {
        let l = format!("l{i}.attn");
        let keys = self.kv_all(s, i, "k", k_new);
        let values = self.kv_all(s, i, "v", v_new);
        let keys_t = self.node(format!("{l}.k_rep_t"), "transpose", &[&keys], Some(json!({"perm": [0, 1, 3, 2]})));
        let mut scores = self.node(format!("{l}.scores"), "matmul", &[q, &keys_t], None);
        if s.scale_attn || s.scale_by_layer {
            let mut scale = 1.0;
            if s.scale_attn {
                scale /= (s.k as f64).sqrt();
            }
            if s.scale_by_layer {
                scale /= (i + 1) as f64;
            }
            scores = self.node(format!("{l}.scaled"), "scale", &[&scores], Some(json!({"value": scale})));
        }
        let masked = self.node(format!("{l}.masked"), "add", &[&scores, "causal_mask"], None);
        let probs = self.node(format!("{l}.probs"), "softmax", &[&masked], Some(json!({"axis": 3})));
        let ctx = self.node(format!("{l}.context"), "matmul", &[&probs, &values], None);
        let ctx_t = self.node(format!("{l}.context_t"), "transpose", &[&ctx], Some(json!({"perm": [0, 2, 1, 3]})));
        for (kv, node) in [("k", k_new), ("v", v_new)] {
            self.output(format!("layer.{i}.{kv}_new"), node, "new_kv", Some((i, kv)));
        }
        self.node(
            format!("{l}.merged"),
            "reshape",
            &[&ctx_t],
            Some(json!({"shape": shape(&[self.layout.batch, "n", "h*k"])})),
        )
    }

    /// One llama / mistral / qwen2 decoder layer.
    fn llama_layer(&mut self, s: &Spec, i: usize, x: &str) -> String {
        let p = format!("model.layers.{i}");
        let l = format!("l{i}");
        let eps = json!({"eps": s.eps});
        let w = self.weight(format!("{p}.input_layernorm.weight"), &["d_model"]);
        let xn = self.node(format!("{l}.input_norm"), "rms_norm", &[x, &w], Some(eps.clone()));
        let attn = format!("{p}.self_attn");
        let la = format!("{l}.attn");
        let q =
            self.linear(&xn, &format!("{attn}.q_proj"), &format!("{la}.q_proj"), "d_model", "h*k", false, s.qkv_bias);
        let k =
            self.linear(&xn, &format!("{attn}.k_proj"), &format!("{la}.k_proj"), "d_model", "g*k", false, s.qkv_bias);
        let v =
            self.linear(&xn, &format!("{attn}.v_proj"), &format!("{la}.v_proj"), "d_model", "g*k", false, s.qkv_bias);
        let q = self.split_heads(&q, &format!("{la}.q"), &format!("{la}.q_heads"), "h", "k");
        let k = self.split_heads(&k, &format!("{la}.k"), &format!("{la}.k_heads"), "g", "k");
        let v_new = self.split_heads(&v, &format!("{la}.v"), &format!("{la}.v_new"), "g", "k");
        let rope = json!({"theta": s.rope_theta});
        let q = self.node(format!("{la}.q"), "rope", &[&q, "positions"], Some(rope.clone()));
        let k_new = self.node(format!("{la}.k_new"), "rope", &[&k, "positions"], Some(rope));
        let merged = self.attention(s, i, &q, &k_new, &v_new);
        let o =
            self.linear(&merged, &format!("{attn}.o_proj"), &format!("{la}.o_proj"), "h*k", "d_model", false, s.o_bias);
        let h = self.node(format!("{la}.residual"), "add", &[x, &o], None);

        let w = self.weight(format!("{p}.post_attention_layernorm.weight"), &["d_model"]);
        let hn = self.node(format!("{l}.post_norm"), "rms_norm", &[&h, &w], Some(eps));
        let mlp = format!("{p}.mlp");
        let lm = format!("{l}.mlp");
        let gate = self.linear(
            &hn,
            &format!("{mlp}.gate_proj"),
            &format!("{lm}.gate_proj"),
            "d_model",
            "ffn",
            false,
            s.mlp_bias,
        );
        let act = self.node(format!("{lm}.act"), "silu", &[&gate], None);
        let up =
            self.linear(&hn, &format!("{mlp}.up_proj"), &format!("{lm}.up_proj"), "d_model", "ffn", false, s.mlp_bias);
        let gated = self.node(format!("{lm}.gated"), "mul", &[&act, &up], None);
        let down = self.linear(
            &gated,
            &format!("{mlp}.down_proj"),
            &format!("{lm}.down_proj"),
            "ffn",
            "d_model",
            false,
            s.mlp_bias,
        );
        let out = self.node(format!("{lm}.residual"), "add", &[&h, &down], None);
        self.caches(i);
        out
    }

    fn layer_norm(&mut self, x: &str, param: &str, id: String, eps: f64) -> String {
        let w = self.weight(format!("{param}.weight"), &["d_model"]);
        let b = self.weight(format!("{param}.bias"), &["d_model"]);
        self.node(id, "layer_norm", &[x, &w, &b], Some(json!({"eps": eps})))
    }

    /// One GPT-2 or GPTBigCode block.
    fn gpt_layer(&mut self, s: &Spec, i: usize, x: &str) -> String {
        let p = format!("transformer.h.{i}");
        let l = format!("l{i}");
        let la = format!("{l}.attn");
        let conv1d = s.family == Family::Gpt2;
        let mqa = s.family == Family::BigCode && s.g == 1;
        let xn = self.layer_norm(x, &format!("{p}.ln_1"), format!("{l}.ln_1"), s.eps);
        let qkv_dim = if mqa { "d_model+2*k" } else { "3*d_model" };
        let qkv =
            self.linear(&xn, &format!("{p}.attn.c_attn"), &format!("{la}.c_attn"), "d_model", qkv_dim, conv1d, true);
        let (q, k_new, v_new) = if s.family == Family::BigCode && !mqa {
            // GPTBigCode MHA lays c_attn out per head as (q, k, v):
            // view(b, n, h, 3k).transpose(1, 2).split((k, 2k), dim=3).
            let heads = self.split_heads(&qkv, &format!("{la}.qkv"), &format!("{la}.qkv_heads"), "h", "3*k");
            let [q, k_new, v_new] =
                [("q", "0", "k"), ("k_new", "k", "2*k"), ("v_new", "2*k", "3*k")].map(|(name, start, end)| {
                    let bounds = json!({"axis": 3, "start": size(start), "end": end});
                    self.node(format!("{la}.{name}"), "slice", &[&heads], Some(bounds))
                });
            (q, k_new, v_new)
        } else {
            // GPT-2 (and MQA GPTBigCode): split the last axis into q, k, v.
            let (k_start, k_end, v_end) =
                if mqa { ("d_model", "d_model+k", "d_model+2*k") } else { ("d_model", "2*d_model", "3*d_model") };
            let slices =
                [("q", "0", "d_model"), ("k", k_start, k_end), ("v", k_end, v_end)].map(|(name, start, end)| {
                    let bounds = json!({"axis": 2, "start": size(start), "end": end});
                    self.node(format!("{la}.{name}_slice"), "slice", &[&qkv], Some(bounds))
                });
            let [sq, sk, sv] = &slices;
            let [q, k, v] =
                [("q", "q", "h", sq), ("k", "k_new", "g", sk), ("v", "v_new", "g", sv)].map(|(pre, id, heads, x)| {
                    let pre = format!("{la}.{pre}");
                    self.split_heads(x, &pre, &format!("{la}.{id}"), heads, "k")
                });
            (q, k, v)
        };
        let merged = self.attention(s, i, &q, &k_new, &v_new);
        let o = self.linear(
            &merged,
            &format!("{p}.attn.c_proj"),
            &format!("{la}.c_proj"),
            "d_model",
            "d_model",
            conv1d,
            true,
        );
        let h = self.node(format!("{la}.residual"), "add", &[x, &o], None);

        let hn = self.layer_norm(&h, &format!("{p}.ln_2"), format!("{l}.ln_2"), s.eps);
        let lm = format!("{l}.mlp");
        let fc = self.linear(&hn, &format!("{p}.mlp.c_fc"), &format!("{lm}.c_fc"), "d_model", "ffn", conv1d, true);
        let attrs = match s.act {
            Act::GeluTanh => Some(json!({"approximate": "tanh"})),
            Act::Gelu | Act::Silu => None,
        };
        let op = if s.act == Act::Silu { "silu" } else { "gelu" };
        let act = self.node(format!("{lm}.act"), op, &[&fc], attrs);
        let proj =
            self.linear(&act, &format!("{p}.mlp.c_proj"), &format!("{lm}.c_proj"), "ffn", "d_model", conv1d, true);
        let out = self.node(format!("{lm}.residual"), "add", &[&h, &proj], None);
        self.caches(i);
        out
    }
}

/// The model.json document of `s`.
pub(super) fn build(s: &Spec) -> Json {
    let layout = if s.multi_level { MULTI } else { SINGLE };
    let mut b = Builder { dtype: s.dtype.name(), layout, inputs: Vec::new(), nodes: Vec::new(), outputs: Vec::new() };
    b.input("token_ids", "token_ids", None, &[layout.batch, "n"], "i32");
    b.input("positions", "position", None, &[layout.batch, "n"], "i32");

    let (embed, mut x) = match s.family {
        Family::Llama => {
            let w = b.weight("model.embed_tokens.weight".into(), &["vocab", "d_model"]);
            let x = b.node("embed".into(), "gather", &[&w, "token_ids"], None);
            (w, x)
        }
        Family::Gpt2 | Family::BigCode => {
            let wte = b.weight("transformer.wte.weight".into(), &["vocab", "d_model"]);
            let wpe = b.weight("transformer.wpe.weight".into(), &["n_pos", "d_model"]);
            let tok = b.node("embed.tokens".into(), "gather", &[&wte, "token_ids"], None);
            let pos = b.node("embed.positions".into(), "gather", &[&wpe, "positions"], None);
            (wte, b.node("embed".into(), "add", &[&tok, &pos], None))
        }
    };
    b.node(
        "causal_mask".into(),
        "causal_mask",
        &[],
        Some(json!({"query": "n", "key": layout.keys, "offset": layout.offset})),
    );
    for i in 0..s.layers {
        x = match s.family {
            Family::Llama => b.llama_layer(s, i, &x),
            Family::Gpt2 | Family::BigCode => b.gpt_layer(s, i, &x),
        };
    }
    let x = match s.family {
        Family::Llama => {
            let w = b.weight("model.norm.weight".into(), &["d_model"]);
            b.node("final_norm".into(), "rms_norm", &[&x, &w], Some(json!({"eps": s.eps})))
        }
        Family::Gpt2 | Family::BigCode => b.layer_norm(&x, "transformer.ln_f", "final_norm".into(), s.eps),
    };
    let head = if s.tie { embed } else { b.weight("lm_head.weight".into(), &["vocab", "d_model"]) };
    let logits = b.node("logits".into(), "matmul", &[&x, &head], Some(json!({"transpose_b": true})));
    let mut outputs = vec![json!({"name": "logits", "node": logits, "role": "logits"})];
    outputs.append(&mut b.outputs);

    let mut constants = Map::new();
    let mut constant = |name: &str, v: usize| {
        constants.insert(name.into(), json!(v));
    };
    constant("n", s.n);
    constant("d_model", s.d_model);
    constant("h", s.h);
    constant("g", s.g);
    if s.g < s.h {
        constant("p", s.h / s.g);
    }
    constant("k", s.k);
    constant("ffn", s.ffn);
    constant("vocab", s.vocab);
    if let Some(n_pos) = s.n_pos {
        constant("n_pos", n_pos);
    }

    let mut doc = Map::new();
    doc.insert("format".into(), json!(crate::ir::FORMAT));
    doc.insert("meta".into(), json!(s.meta));
    let runtime: &[&str] = if layout.multi { &["P", "S", "m_s", "m_c", "m_d"] } else { &["b", "m_c", "m_d"] };
    doc.insert("dims".into(), json!({"runtime": runtime, "constants": constants}));
    doc.insert("inputs".into(), Json::Array(b.inputs));
    doc.insert("nodes".into(), Json::Array(b.nodes));
    doc.insert("outputs".into(), Json::Array(outputs));
    Json::Object(doc)
}
