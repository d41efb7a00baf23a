//! Hugging Face config.json → decode-step graph (a model.json document).
//!
//! [`build`] reads a model's `config.json` and writes the graph of one decode
//! step the way the framework computes it: Hugging Face parameter names and
//! shapes, attention over `concat(broadcast(K_ctx), K_dec, K_new)` with
//! `repeat_kv` for grouped-query and multi-query heads. Supported
//! `model_type`s: see [`SUPPORTED`]. With [`HfOptions::multi_level`] the
//! keys are `concat(broadcast(K_sys), repeat_S(K_ctx), K_dec, K_new)`: a
//! system prompt shared by all samples and a context per prompt shared by
//! its samples.

mod config;
mod graph;

use crate::import::ImportError;
use crate::ir::DType;
use config::Config;
use std::collections::BTreeMap;

/// The `model_type`s [`build`] reads.
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "gpt2", "gpt_bigcode"];

/// Largest size (hidden size, heads, vocab, …) read from a config, so size
/// arithmetic in the graph cannot overflow.
const MAX_SIZE: usize = 1 << 24;

/// Largest number of layers a generated graph may have.
const MAX_LAYERS: usize = 1024;

/// Largest `--new-tokens` (a prefill chunk).
const MAX_NEW_TOKENS: usize = 65536;

/// Options of `bifurc import-hf`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HfOptions {
    /// Build only the first `layers` layers (at most the config's count).
    pub layers: Option<usize>,
    /// Float type of weights, caches and activations, instead of the
    /// config's `torch_dtype`.
    pub dtype: Option<DType>,
    /// Multi-level sharing: `P` prompts of `S` samples each (batch axis
    /// `P*S`) share a system prompt (`cache.{i}.{kv}_sys [g, m_s, k]`,
    /// broadcast over all samples); each prompt's context
    /// (`cache.{i}.{kv}_ctx [P, g, m_c, k]`) is repeated over its `S`
    /// samples. Runtime dims `P, S, m_s, m_c, m_d`; meta `sharing:
    /// multi-level`.
    pub multi_level: bool,
    /// `n`, the tokens each sample feeds per step (default 1: a decode
    /// step). More make a prefill graph: `n` prompt tokens at once at
    /// positions `m_c + m_d ..`, each attending to the caches and to the
    /// new tokens up to itself (the graph's causal mask); the new K/V rows
    /// `[b, g, n, k]` and logits `[b, n, vocab]` of all of them come out.
    pub new_tokens: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("config.json is not valid JSON: {0}")]
    Json(String),
    #[error("config.json must be a JSON object, got {0}")]
    NotObject(String),
    #[error("unsupported model_type `{model_type}` (supported: {})", SUPPORTED.join(", "))]
    UnsupportedModel { model_type: String },
    #[error("config field `{field}` is missing")]
    MissingField { field: String },
    #[error("config field `{field}` must be {expected}, got {found}")]
    BadField { field: String, expected: &'static str, found: String },
    #[error("unsupported {model_type} config: {feature}")]
    Unsupported { model_type: String, feature: String },
    #[error("{0}")]
    BadOption(String),
    /// (The import error is in the message, not a source: printed with
    /// its chain, `{:#}`, it came out twice.)
    #[error("the generated graph does not import (a bifurc bug, please report it): {0}")]
    Graph(ImportError),
}

/// Which block structure a model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// llama, mistral, qwen2: RMSNorm, rotary, SwiGLU MLP, `nn.Linear`.
    Llama,
    /// GPT-2: LayerNorm, learned positions, GELU MLP, `Conv1D` (`[in, out]`).
    Gpt2,
    /// GPTBigCode (StarCoder, SantaCoder): GPT-2 layout with `nn.Linear`
    /// and multi-query attention.
    BigCode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Silu,
    Gelu,
    GeluTanh,
}

/// Everything the graph builder needs, read and checked from a config.
#[derive(Clone, Debug)]
struct Spec {
    family: Family,
    /// Layers to build.
    layers: usize,
    /// Layers in the config.
    config_layers: usize,
    d_model: usize,
    /// Query heads.
    h: usize,
    /// KV heads.
    g: usize,
    /// Head dim.
    k: usize,
    ffn: usize,
    vocab: usize,
    /// Learned positions (gpt2, gpt_bigcode).
    n_pos: Option<usize>,
    eps: f64,
    rope_theta: f64,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    tie: bool,
    act: Act,
    /// Scale scores by `1/sqrt(k)`.
    scale_attn: bool,
    /// GPT-2 `scale_attn_by_inverse_layer_idx`: also scale by `1/(layer+1)`.
    scale_by_layer: bool,
    dtype: DType,
    /// See [`HfOptions::multi_level`].
    multi_level: bool,
    /// See [`HfOptions::new_tokens`].
    n: usize,
    meta: BTreeMap<String, String>,
}

/// Builds the decode-step graph of the model `config_json` describes and
/// returns its model.json document (checked by [`crate::import::from_value`]).
/// Write it with [`crate::export::to_string`].
pub fn build(config_json: &str, opts: &HfOptions) -> Result<serde_json::Value, HfError> {
    let value = Config::parse(config_json)?;
    let cfg = Config::new(&value)?;
    let spec = read_spec(&cfg, opts)?;
    let doc = graph::build(&spec);
    crate::import::from_value(&doc).map_err(HfError::Graph)?;
    Ok(doc)
}

fn unsupported(model_type: &str, feature: impl Into<String>) -> HfError {
    HfError::Unsupported { model_type: model_type.to_string(), feature: feature.into() }
}

fn read_spec(cfg: &Config, opts: &HfOptions) -> Result<Spec, HfError> {
    let model_type = cfg.req_str("model_type")?;
    let family = match model_type {
        "llama" | "mistral" | "qwen2" => Family::Llama,
        "gpt2" => Family::Gpt2,
        "gpt_bigcode" => Family::BigCode,
        other => return Err(HfError::UnsupportedModel { model_type: other.to_string() }),
    };
    let mt = model_type;
    let size = |field: &str| -> Result<usize, HfError> { limit(field, cfg.req_usize(field)?) };
    let opt_size =
        |field: &str| -> Result<Option<usize>, HfError> { cfg.opt_usize(field)?.map(|v| limit(field, v)).transpose() };
    let flag = |field: &str, default: bool| -> Result<bool, HfError> { Ok(cfg.opt_bool(field)?.unwrap_or(default)) };

    let mut spec = match family {
        Family::Llama => {
            let d_model = size("hidden_size")?;
            let h = size("num_attention_heads")?;
            let g = opt_size("num_key_value_heads")?.unwrap_or(h);
            let config_layers = size("num_hidden_layers")?;
            let ffn = size("intermediate_size")?;
            let vocab = size("vocab_size")?;
            if h % g != 0 {
                return Err(unsupported(
                    mt,
                    format!("num_attention_heads ({h}) is not divisible by num_key_value_heads ({g})"),
                ));
            }
            let k = match opt_size("head_dim")? {
                Some(k) => k,
                None if d_model % h == 0 => d_model / h,
                None => {
                    return Err(unsupported(
                        mt,
                        format!(
                            "hidden_size ({d_model}) is not divisible by num_attention_heads ({h}) and there is no head_dim"
                        ),
                    ))
                }
            };
            if k % 2 != 0 {
                return Err(unsupported(mt, format!("head dim {k} is odd (rotary embedding needs an even head dim)")));
            }
            if let Some(v) = cfg.get("rope_scaling") {
                return Err(unsupported(mt, format!("rope_scaling {v} (only null is supported)")));
            }
            let act = match cfg.opt_str("hidden_act")?.unwrap_or("silu") {
                "silu" | "swish" => Act::Silu,
                other => return Err(unsupported(mt, format!("hidden_act `{other}` (supported: silu)"))),
            };
            check_sliding_window(cfg, mt)?;
            let (qkv_bias, o_bias, mlp_bias) = match model_type {
                // LlamaAttention: q/k/v/o all take `bias=attention_bias`.
                "llama" => {
                    let ab = flag("attention_bias", false)?;
                    (ab, ab, flag("mlp_bias", false)?)
                }
                "qwen2" => (true, false, false),
                _ => (false, false, false),
            };
            Spec {
                family,
                layers: config_layers,
                config_layers,
                d_model,
                h,
                g,
                k,
                ffn,
                vocab,
                n_pos: None,
                eps: cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
                rope_theta: cfg.opt_f64("rope_theta")?.unwrap_or(10000.0),
                qkv_bias,
                o_bias,
                mlp_bias,
                tie: flag("tie_word_embeddings", false)?,
                act,
                scale_attn: true,
                scale_by_layer: false,
                dtype: DType::F32,
                multi_level: opts.multi_level,
                n: 1,
                meta: BTreeMap::new(),
            }
        }
        Family::Gpt2 | Family::BigCode => {
            let d_model = size("n_embd")?;
            let h = size("n_head")?;
            let config_layers = size("n_layer")?;
            let vocab = size("vocab_size")?;
            let n_pos = size("n_positions")?;
            let ffn = match opt_size("n_inner")? {
                Some(f) => f,
                None => limit("n_inner", d_model.saturating_mul(4))?,
            };
            if d_model % h != 0 {
                return Err(unsupported(mt, format!("n_embd ({d_model}) is not divisible by n_head ({h})")));
            }
            let k = d_model / h;
            let default_act = if family == Family::Gpt2 { "gelu_new" } else { "gelu_pytorch_tanh" };
            let act = match cfg.opt_str("activation_function")?.unwrap_or(default_act) {
                "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
                "gelu" => Act::Gelu,
                other => {
                    return Err(unsupported(
                        mt,
                        format!(
                            "activation_function `{other}` (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu)"
                        ),
                    ))
                }
            };
            let g = if family == Family::BigCode && flag("multi_query", true)? { 1 } else { h };
            let scale_by_layer = family == Family::Gpt2 && flag("scale_attn_by_inverse_layer_idx", false)?;
            Spec {
                family,
                layers: config_layers,
                config_layers,
                d_model,
                h,
                g,
                k,
                ffn,
                vocab,
                n_pos: Some(n_pos),
                eps: cfg.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
                rope_theta: 0.0,
                qkv_bias: true,
                o_bias: true,
                mlp_bias: true,
                tie: flag("tie_word_embeddings", true)?,
                act,
                scale_attn: flag("scale_attn_weights", true)?,
                scale_by_layer,
                dtype: DType::F32,
                multi_level: opts.multi_level,
                n: 1,
                meta: BTreeMap::new(),
            }
        }
    };

    spec.layers = match opts.layers {
        None => spec.config_layers,
        Some(0) => return Err(HfError::BadOption("--layers must be at least 1".into())),
        Some(n) if n > spec.config_layers => {
            return Err(HfError::BadOption(format!(
                "--layers {n} is more than the {} layers in the config",
                spec.config_layers
            )))
        }
        Some(n) => n,
    };
    if spec.layers > MAX_LAYERS {
        return Err(unsupported(mt, format!("{} layers (at most {MAX_LAYERS} are built; pass --layers)", spec.layers)));
    }
    spec.n = match opts.new_tokens {
        None => 1,
        Some(0) => return Err(HfError::BadOption("--new-tokens must be at least 1".into())),
        Some(n) if n > MAX_NEW_TOKENS => {
            return Err(HfError::BadOption(format!("--new-tokens {n} is more than {MAX_NEW_TOKENS}")))
        }
        Some(n) => n,
    };
    spec.dtype = match opts.dtype {
        Some(d) if d.is_float() => d,
        Some(d) => return Err(HfError::BadOption(format!("--dtype {d} is not a float type (use f32, f16 or bf16)"))),
        None => config_dtype(cfg)?,
    };

    let meta = &mut spec.meta;
    meta.insert("architecture".into(), model_type.to_string());
    meta.insert("source".into(), "hf-config".into());
    meta.insert("layers".into(), spec.layers.to_string());
    if spec.layers != spec.config_layers {
        meta.insert("config_layers".into(), spec.config_layers.to_string());
    }
    meta.insert("dtype".into(), spec.dtype.name().into());
    let heads = if spec.g == spec.h {
        "mha"
    } else if spec.g == 1 {
        "mqa"
    } else {
        "gqa"
    };
    meta.insert("attention".into(), heads.into());
    if spec.multi_level {
        meta.insert("sharing".into(), "multi-level".into());
    }
    if spec.n > 1 {
        meta.insert("new_tokens".into(), spec.n.to_string());
    }
    if let Some(class) = cfg.architecture_class() {
        meta.insert("hf_class".into(), class.into());
    }
    if let Some(name) = cfg.get("_name_or_path").and_then(|v| v.as_str()).filter(|s| !s.is_empty()) {
        meta.insert("name".into(), name.into());
    }
    Ok(spec)
}

/// Sliding-window attention is not supported: mistral uses it whenever
/// `sliding_window` is set (absent means 4096), qwen2 only with
/// `use_sliding_window`; llama has no such field.
fn check_sliding_window(cfg: &Config, mt: &str) -> Result<(), HfError> {
    let enabled = match mt {
        "mistral" => true,
        "qwen2" => cfg.opt_bool("use_sliding_window")?.unwrap_or(false),
        _ => false,
    };
    if !enabled {
        return Ok(());
    }
    match cfg.get("sliding_window") {
        Some(w) if mt == "qwen2" => Err(unsupported(
            mt,
            format!("use_sliding_window is true with sliding_window {w} (sliding-window attention is not supported)"),
        )),
        Some(w) => Err(unsupported(
            mt,
            format!("sliding_window {w} (sliding-window attention is not supported; null disables it)"),
        )),
        None if mt == "mistral" && !cfg.has("sliding_window") => Err(unsupported(
            mt,
            "sliding_window is absent, which Hugging Face reads as 4096 for mistral \
             (sliding-window attention is not supported; set it to null)",
        )),
        None => Ok(()),
    }
}

fn limit(field: &str, v: usize) -> Result<usize, HfError> {
    if v > MAX_SIZE {
        return Err(HfError::BadField {
            field: field.to_string(),
            expected: "at most 16777216",
            found: format!("the number {v}"),
        });
    }
    Ok(v)
}

/// `torch_dtype` (or the newer `dtype`); absent means float32.
fn config_dtype(cfg: &Config) -> Result<DType, HfError> {
    let field = if cfg.get("torch_dtype").is_some() { "torch_dtype" } else { "dtype" };
    Ok(match cfg.opt_str(field)? {
        None | Some("float32") | Some("float") => DType::F32,
        Some("float16") | Some("half") => DType::F16,
        Some("bfloat16") => DType::BF16,
        Some(other) => {
            return Err(HfError::BadField {
                field: field.to_string(),
                expected: "float32, float16 or bfloat16",
                found: format!("the string {}", serde_json::Value::from(other)),
            })
        }
    })
}
