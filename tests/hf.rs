//! `import-hf`: Hugging Face config.json → decode-step graph.
//!
//! `examples_are_up_to_date` regenerates every `examples/*/model.json` from
//! its config.json (with the options `generated()` gives it) and compares; run
//! with `BIFURC_BLESS=1` to rewrite them.
//!
//! Everything sits in `mod hf` so that `cargo test -p bifurc hf` selects it.

mod hf {
    use bifurc::hf::{build, HfError, HfOptions};
    use bifurc::ir::{DType, Graph, Op, OutputRole, Role, Value};
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// Single-level examples (one context shared by all `b` samples).
    const EXAMPLES: &[&str] =
        &["llama-2-7b", "mistral-7b", "llama-3-8b", "qwen2-7b", "gpt2", "starcoder", "santacoder", "tiny"];

    /// Examples generated with multi-level sharing.
    const MULTI_LEVEL_EXAMPLES: &[&str] = &["multilevel"];

    /// Every generated example with the options its model.json is built with.
    fn generated() -> Vec<(&'static str, HfOptions)> {
        let multi = HfOptions { multi_level: true, ..Default::default() };
        EXAMPLES
            .iter()
            .map(|&name| (name, HfOptions::default()))
            .chain(MULTI_LEVEL_EXAMPLES.iter().map(|&name| (name, multi)))
            .collect()
    }

    fn example_dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
    }

    fn config(name: &str) -> String {
        let path = example_dir(name).join("config.json");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn graph_with(name: &str, opts: &HfOptions) -> Graph {
        let doc = build(&config(name), opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        bifurc::import::from_value(&doc).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn graph(name: &str) -> Graph {
        graph_with(name, &HfOptions::default())
    }

    fn params(g: &Graph) -> i64 {
        let point = BTreeMap::new();
        g.inputs
            .iter()
            .filter(|i| i.role == Role::Weight)
            .map(|i| i.shape.iter().map(|d| g.dims.eval(d, &point).unwrap()).product::<i64>())
            .sum()
    }

    fn err(config: &str) -> String {
        build(config, &HfOptions::default()).unwrap_err().to_string()
    }

    /// Edits the tiny config: sets (or, with `null`, keeps as null) each field.
    fn tiny_with(edits: &[(&str, serde_json::Value)]) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&config("tiny")).unwrap();
        for (k, x) in edits {
            v[*k] = x.clone();
        }
        v.to_string()
    }

    fn tiny_without(field: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&config("tiny")).unwrap();
        v.as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    #[test]
    fn examples_are_up_to_date() {
        let bless = std::env::var("BIFURC_BLESS").is_ok_and(|v| v == "1");
        let mut stale = Vec::new();
        for (name, opts) in generated() {
            let doc = build(&config(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            let text = bifurc::export::to_string(&doc);
            let path = example_dir(name).join("model.json");
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            if on_disk != text {
                if bless {
                    std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                } else {
                    stale.push(path.display().to_string());
                }
            }
            assert!(text.len() < 1 << 20, "{name}: model.json is {} bytes", text.len());
        }
        assert!(stale.is_empty(), "out of date (rerun with BIFURC_BLESS=1): {}", stale.join(", "));
    }

    #[test]
    fn build_is_deterministic_and_round_trips_through_export() {
        for (name, opts) in generated() {
            let a = build(&config(name), &opts).unwrap();
            let b = build(&config(name), &opts).unwrap();
            assert_eq!(bifurc::export::to_string(&a), bifurc::export::to_string(&b), "{name}");
            let g = bifurc::import::from_value(&a).unwrap();
            assert_eq!(bifurc::export::to_json(&g), a, "{name}: export(import(doc)) differs from doc");
        }
    }

    /// Every layer attends over `concat([broadcast(ctx cache), dec cache, new
    /// rows], axis 2)`, and the new rows it outputs are the ones it attended to.
    #[test]
    fn new_rows_are_the_rows_attended_to() {
        for name in EXAMPLES {
            let g = graph_with(name, &HfOptions { layers: Some(2), dtype: None, ..Default::default() });
            let mut seen = 0;
            for o in &g.outputs {
                let OutputRole::NewKv { layer, kv } = o.role else {
                    continue;
                };
                seen += 1;
                let users: Vec<_> = g
                    .nodes
                    .iter()
                    .filter(|n| matches!(n.op, Op::Concat { axis: 2 }) && n.inputs.last() == Some(&o.value))
                    .collect();
                assert_eq!(users.len(), 1, "{name}: {}", o.name);
                let ins = &users[0].inputs;
                assert_eq!(ins.len(), 3);
                let Value::Node(b) = ins[0] else { panic!("{name}: context is not broadcast") };
                assert!(matches!(g.nodes[b].op, Op::Broadcast { .. }));
                let Value::Input(ctx) = g.nodes[b].inputs[0] else { panic!() };
                assert_eq!(g.inputs[ctx].role, Role::ContextKv { layer, kv });
                let Value::Input(dec) = ins[1] else { panic!() };
                assert_eq!(g.inputs[dec].role, Role::DecodeKv { layer, kv });
                assert_eq!(bifurc::ir::fmt_shape(g.shape_of(o.value)), "[b, g, n, k]", "{name}: {}", o.name);
            }
            assert_eq!(seen, 4, "{name}");
        }
    }

    #[test]
    fn parameter_counts_match_the_published_models() {
        assert_eq!(params(&graph("llama-2-7b")), 6_738_415_616);
        assert_eq!(params(&graph("mistral-7b")), 7_248_023_552);
        assert_eq!(params(&graph("llama-3-8b")), 8_030_261_248);
        assert_eq!(params(&graph("qwen2-7b")), 7_615_616_512);
        // Tied head; wpe counted.
        assert_eq!(params(&graph("gpt2")), 124_439_808);
        assert_eq!(params(&graph("starcoder")), 15_517_456_384);
        assert_eq!(params(&graph("santacoder")), 1_124_886_528);
    }

    #[test]
    fn dims_meta_and_dtypes() {
        let g = graph("llama-3-8b");
        let c = |n: &str| g.dims.constant(n);
        assert_eq!(g.dims.runtime, ["b", "m_c", "m_d"]);
        assert_eq!(
            (c("n"), c("d_model"), c("h"), c("g"), c("p"), c("k"), c("ffn"), c("vocab")),
            (Some(1), Some(4096), Some(32), Some(8), Some(4), Some(128), Some(14336), Some(128256))
        );
        assert_eq!(g.meta["architecture"], "llama");
        assert_eq!(g.meta["source"], "hf-config");
        assert_eq!(g.meta["layers"], "32");
        assert_eq!(g.meta["attention"], "gqa");
        assert_eq!(g.layers(), 32);
        for i in &g.inputs {
            let want = if matches!(i.role, Role::TokenIds | Role::Position) { DType::I32 } else { DType::BF16 };
            assert_eq!(i.dtype, want, "{}", i.name);
        }
        assert!(g.nodes.iter().all(|n| n.dtype == DType::BF16));

        let mha = graph("llama-2-7b");
        assert_eq!(mha.dims.constant("p"), None);
        assert_eq!(mha.inputs[2].dtype, DType::F16);
        let gpt2 = graph("gpt2");
        assert_eq!((gpt2.dims.constant("n_pos"), gpt2.dims.constant("ffn")), (Some(1024), Some(3072)));
        assert_eq!(gpt2.inputs[2].dtype, DType::F32, "no torch_dtype means f32");
        let sc = graph("starcoder");
        assert_eq!(
            (sc.dims.constant("g"), sc.dims.constant("p"), sc.meta["attention"].as_str()),
            (Some(1), Some(48), "mqa")
        );

        let f16 = graph_with("tiny", &HfOptions { layers: None, dtype: Some(DType::F16), ..Default::default() });
        assert!(f16.nodes.iter().all(|n| n.dtype == DType::F16));
        assert_eq!(f16.meta["dtype"], "f16");
    }

    fn shape_of(g: &Graph, name: &str) -> String {
        let v = g.find(name).unwrap_or_else(|| panic!("no value `{name}`"));
        bifurc::ir::fmt_shape(g.shape_of(v))
    }

    #[test]
    fn tiny_gqa_graph_has_the_conventional_shapes() {
        let g = graph("tiny");
        assert_eq!(g.layers(), 2);
        for (name, want) in [
            ("token_ids", "[b, n]"),
            ("model.embed_tokens.weight", "[vocab, d_model]"),
            ("model.layers.1.self_attn.q_proj.weight", "[h*k, d_model]"),
            ("model.layers.1.self_attn.k_proj.weight", "[g*k, d_model]"),
            ("model.layers.1.self_attn.o_proj.weight", "[d_model, h*k]"),
            ("model.layers.1.mlp.down_proj.weight", "[d_model, ffn]"),
            ("cache.1.k_ctx", "[g, m_c, k]"),
            ("cache.1.v_dec", "[b, g, m_d, k]"),
            ("embed", "[b, n, d_model]"),
            ("causal_mask", "[n, m_c+m_d+n]"),
            ("l1.attn.q", "[b, h, n, k]"),
            ("l1.attn.k_new", "[b, g, n, k]"),
            ("l1.attn.v_new", "[b, g, n, k]"),
            ("l1.attn.k_ctx_b", "[b, g, m_c, k]"),
            ("l1.attn.k_all", "[b, g, m_c+m_d+n, k]"),
            ("l1.attn.k_expanded", "[b, g, p, m_c+m_d+n, k]"),
            ("l1.attn.v_rep", "[b, h, m_c+m_d+n, k]"),
            ("l1.attn.scores", "[b, h, n, m_c+m_d+n]"),
            ("l1.attn.merged", "[b, n, h*k]"),
            ("l1.mlp.residual", "[b, n, d_model]"),
            ("logits", "[b, n, vocab]"),
        ] {
            assert_eq!(shape_of(&g, name), want, "{name}");
        }
        assert!(g.find("lm_head.weight").is_some());
        let mask = &g.nodes[match g.find("causal_mask") {
            Some(Value::Node(i)) => i,
            other => panic!("{other:?}"),
        }];
        let size = |s: &str| bifurc::ir::Poly::parse(s).unwrap();
        assert_eq!(mask.op, Op::CausalMask { query: size("n"), key: size("m_c+m_d+n"), offset: size("m_c+m_d") });
        // Rope on q and k_new, not on v.
        let k_new = &g.nodes[match g.find("l0.attn.k_new") {
            Some(Value::Node(i)) => i,
            other => panic!("{other:?}"),
        }];
        assert_eq!(k_new.op, Op::Rope { theta: 10000.0 });
        // Outputs: logits, then k/v of each layer.
        let roles: Vec<(String, OutputRole)> = g.outputs.iter().map(|o| (o.name.clone(), o.role)).collect();
        assert_eq!(roles[0], ("logits".to_string(), OutputRole::Logits));
        assert_eq!(roles.len(), 5);
        assert_eq!(roles[3].0, "layer.1.k_new");
        assert_eq!(g.name_of(g.outputs[3].value), "l1.attn.k_new");
        assert!(matches!(g.outputs[4].role, OutputRole::NewKv { layer: 1, kv: bifurc::ir::Kv::V }));
    }

    #[test]
    fn gpt_family_layouts() {
        let g = graph("gpt2");
        assert_eq!(shape_of(&g, "transformer.h.0.attn.c_attn.weight"), "[d_model, 3*d_model]");
        assert_eq!(shape_of(&g, "transformer.h.0.mlp.c_fc.weight"), "[d_model, ffn]");
        assert_eq!(shape_of(&g, "transformer.wpe.weight"), "[n_pos, d_model]");
        assert_eq!(shape_of(&g, "l11.attn.k_new"), "[b, g, n, k]");
        assert!(g.find("lm_head.weight").is_none(), "gpt2 ties the head to wte");
        assert!(g.find("l0.attn.k_rep").is_none(), "MHA needs no repeat_kv");

        let sc = graph("starcoder");
        assert_eq!(shape_of(&sc, "transformer.h.0.attn.c_attn.weight"), "[d_model+2*k, d_model]");
        assert_eq!(shape_of(&sc, "transformer.h.0.mlp.c_proj.weight"), "[d_model, ffn]");
        assert_eq!(shape_of(&sc, "l39.attn.k_new"), "[b, g, n, k]");
        assert_eq!(shape_of(&sc, "l39.attn.k_rep"), "[b, h, m_c+m_d+n, k]");
        assert_eq!(shape_of(&sc, "cache.39.v_ctx"), "[g, m_c, k]");

        let mha = tiny_gpt(&[("model_type", "gpt_bigcode".into()), ("multi_query", false.into())]);
        assert_eq!(shape_of(&mha, "transformer.h.0.attn.c_attn.weight"), "[3*d_model, d_model]");
        assert_eq!(shape_of(&mha, "l0.attn.qkv_heads"), "[b, h, n, 3*k]");
        assert_eq!(shape_of(&mha, "l0.attn.v_new"), "[b, h, n, k]");
        assert_eq!(mha.dims.constant("g"), mha.dims.constant("h"));
    }

    /// gpt2's config with edits, 2 layers.
    fn tiny_gpt(edits: &[(&str, serde_json::Value)]) -> Graph {
        let mut v: serde_json::Value = serde_json::from_str(&config("gpt2")).unwrap();
        for (k, x) in edits {
            v[*k] = x.clone();
        }
        let doc = build(&v.to_string(), &HfOptions { layers: Some(2), dtype: None, ..Default::default() }).unwrap();
        bifurc::import::from_value(&doc).unwrap()
    }

    #[test]
    fn layers_option_truncates() {
        let g = graph_with("llama-2-7b", &HfOptions { layers: Some(2), dtype: None, ..Default::default() });
        assert_eq!(g.layers(), 2);
        assert_eq!(g.meta["layers"], "2");
        assert_eq!(g.meta["config_layers"], "32");
        assert!(g.find("model.layers.1.mlp.up_proj.weight").is_some());
        assert!(g.find("model.layers.2.mlp.up_proj.weight").is_none());
        assert_eq!(g.outputs.len(), 1 + 2 * 2);

        let too_many =
            build(&config("tiny"), &HfOptions { layers: Some(3), dtype: None, ..Default::default() }).unwrap_err();
        assert!(matches!(too_many, HfError::BadOption(_)));
        assert_eq!(too_many.to_string(), "--layers 3 is more than the 2 layers in the config");
        let zero =
            build(&config("tiny"), &HfOptions { layers: Some(0), dtype: None, ..Default::default() }).unwrap_err();
        assert_eq!(zero.to_string(), "--layers must be at least 1");
        let int = build(&config("tiny"), &HfOptions { layers: None, dtype: Some(DType::I32), ..Default::default() })
            .unwrap_err();
        assert!(int.to_string().contains("not a float type"), "{int}");
        let none = build(&config("tiny"), &HfOptions { new_tokens: Some(0), ..Default::default() }).unwrap_err();
        assert_eq!(none.to_string(), "--new-tokens must be at least 1");
        // A prefill graph: n new tokens per sample, all their rows and logits out.
        let g = graph_with("tiny", &HfOptions { new_tokens: Some(5), ..Default::default() });
        assert!(g.dims.constants.iter().any(|(name, v)| name == "n" && *v == 5));
        assert_eq!(g.meta["new_tokens"], "5");
        let logits = g.outputs.iter().find(|o| o.name == "logits").unwrap();
        let shape: Vec<String> = g.shape_of(logits.value).iter().map(ToString::to_string).collect();
        assert_eq!(shape, ["b", "n", "vocab"].map(String::from));
    }

    #[test]
    fn biases_follow_the_architecture() {
        let q = graph_with("qwen2-7b", &HfOptions { layers: Some(1), dtype: None, ..Default::default() });
        assert_eq!(shape_of(&q, "model.layers.0.self_attn.k_proj.bias"), "[g*k]");
        assert!(q.find("model.layers.0.self_attn.o_proj.bias").is_none());
        let l = graph("tiny");
        assert!(l.find("model.layers.0.self_attn.q_proj.bias").is_none());
        let doc = build(&tiny_with(&[("attention_bias", true.into())]), &HfOptions::default()).unwrap();
        let lb = bifurc::import::from_value(&doc).unwrap();
        for w in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            assert!(lb.find(&format!("model.layers.0.self_attn.{w}.bias")).is_some(), "{w}");
        }
        let tied = bifurc::import::from_value(
            &build(&tiny_with(&[("tie_word_embeddings", true.into())]), &HfOptions::default()).unwrap(),
        )
        .unwrap();
        assert!(tied.find("lm_head.weight").is_none());
        assert_eq!(params(&tied), params(&l) - 256 * 64);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            err(r#"{"model_type": "bert"}"#),
            "unsupported model_type `bert` (supported: llama, mistral, qwen2, gpt2, gpt_bigcode)"
        );
        assert_eq!(err("{}"), "config field `model_type` is missing");
        assert!(err("{\"model_type\": ").starts_with("config.json is not valid JSON"));
        assert!(err("[]").starts_with("config.json must be a JSON object"));
        assert_eq!(err(&tiny_without("hidden_size")), "config field `hidden_size` is missing");
        assert_eq!(
            err(&tiny_with(&[("vocab_size", "256".into())])),
            "config field `vocab_size` must be a positive integer, got the string \"256\""
        );
        assert_eq!(
            err(&tiny_with(&[("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0}))])),
            "unsupported llama config: rope_scaling {\"type\":\"linear\",\"factor\":2.0} (only null is supported)"
        );
        assert_eq!(
            err(&tiny_with(&[("num_key_value_heads", 3.into())])),
            "unsupported llama config: num_attention_heads (4) is not divisible by num_key_value_heads (3)"
        );
        assert_eq!(
        err(&tiny_with(&[("hidden_size", 66.into())]).replace(",\"head_dim\":16", "")),
        "unsupported llama config: hidden_size (66) is not divisible by num_attention_heads (4) and there is no head_dim"
    );
        assert!(err(&tiny_with(&[("hidden_act", "gelu".into())])).contains("hidden_act `gelu`"));

        let mistral = config("mistral-7b");
        let windowed = mistral.replace("\"sliding_window\": null", "\"sliding_window\": 4096");
        assert_eq!(
        err(&windowed),
        "unsupported mistral config: sliding_window 4096 (sliding-window attention is not supported; null disables it)"
    );
        let absent = mistral.replace("\"sliding_window\": null,", "");
        assert!(err(&absent).contains("sliding_window is absent"), "{}", err(&absent));
        let qwen = config("qwen2-7b");
        let qwen_windowed = qwen.replace("\"use_sliding_window\": false", "\"use_sliding_window\": true");
        assert!(err(&qwen_windowed).starts_with("unsupported qwen2 config: use_sliding_window is true"));

        let gpt2 = config("gpt2");
        assert!(err(&gpt2.replace("\"n_head\": 12", "\"n_head\": 7")).contains("not divisible by n_head (7)"));
        assert!(err(&gpt2.replace("gelu_new", "relu")).contains("activation_function `relu`"));
        assert_eq!(
            err(&gpt2.replace("\"n_embd\": 768", "\"n_embd\": 768.5")),
            "config field `n_embd` must be a positive integer, got the number 768.5"
        );
    }

    #[test]
    fn hostile_configs_do_not_panic() {
        for text in [
            r#"{"model_type": "llama", "hidden_size": 1e30}"#,
            r#"{"model_type": "llama", "hidden_size": -4}"#,
            r#"{"model_type": 7}"#,
            r#"{"model_type": null}"#,
            r#"{"model_type": "gpt2", "n_embd": 18446744073709551615, "n_head": 1, "n_layer": 1, "vocab_size": 1, "n_positions": 1}"#,
            r#"{"model_type": "llama", "hidden_size": 16777216, "num_attention_heads": 1, "num_hidden_layers": 1000000000, "intermediate_size": 1, "vocab_size": 1}"#,
            r#"{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 1, "vocab_size": 1, "head_dim": 3}"#,
            r#"{"model_type": "gpt_bigcode", "n_embd": 8, "n_head": 2, "n_layer": 1, "vocab_size": 1, "n_positions": 1, "multi_query": "yes"}"#,
        ] {
            let e = err(text);
            assert!(!e.contains("bifurc bug"), "{text}: {e}");
        }
        // The largest sizes the importer accepts still give a graph that imports.
        let big = r#"{"model_type": "llama", "hidden_size": 16777216, "num_attention_heads": 16777216,
        "num_key_value_heads": 1, "head_dim": 16777216, "num_hidden_layers": 1,
        "intermediate_size": 16777216, "vocab_size": 16777216}"#;
        build(big, &HfOptions::default()).unwrap();
    }

    mod step_chaining {
        //! Runs generated graphs in the reference interpreter: the new K/V rows
        //! a step outputs, appended to the decode cache, must give the same next
        //! step as the same rows stored in the context cache. This checks that
        //! `k_new`/`v_new`, both caches, positions and the mask agree on layout.

        use super::*;
        use bifurc::interp::{random_inputs, run, Tensor};
        use std::collections::HashMap;

        fn point(b: i64, m_c: i64, m_d: i64) -> BTreeMap<String, i64> {
            BTreeMap::from([("b".to_string(), b), ("m_c".to_string(), m_c), ("m_d".to_string(), m_d)])
        }

        fn ints(shape: Vec<usize>, v: &[i64]) -> Tensor {
            Tensor::from_ints(shape, v).unwrap()
        }

        fn check(name: &str, config: &str) {
            let doc = build(config, &HfOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let g = bifurc::import::from_value(&doc).unwrap();
            let layers = g.layers();
            let (m_c, b) = (3usize, 2usize);

            // Step 1: both samples see the same token, so their new rows agree.
            let p1 = point(b as i64, m_c as i64, 0);
            let mut in1 = random_inputs(&g, &p1, 11).unwrap();
            in1.insert("token_ids".into(), ints(vec![b, 1], &[5, 5]));
            let out1 = run(&g, &p1, &in1).unwrap_or_else(|e| panic!("{name}: {e}"));
            let new = |i: usize, kv: &str| &out1[&format!("layer.{i}.{kv}_new")];
            let row = new(0, "k").data.len() / b;
            assert_eq!(new(0, "k").data[..row], new(0, "k").data[row..], "{name}: samples disagree");

            let step2 = |in2: &mut HashMap<String, Tensor>| {
                in2.insert("token_ids".into(), ints(vec![b, 1], &[7, 2]));
                in2.insert("positions".into(), ints(vec![b, 1], &[m_c as i64 + 1, m_c as i64 + 1]));
            };
            // Step 2a: the rows go to the decode cache.
            let mut in2a = in1.clone();
            step2(&mut in2a);
            for i in 0..layers {
                for kv in ["k", "v"] {
                    in2a.insert(format!("cache.{i}.{kv}_dec"), new(i, kv).clone());
                }
            }
            let out2a = run(&g, &point(b as i64, m_c as i64, 1), &in2a).unwrap_or_else(|e| panic!("{name}: {e}"));
            // Step 2b: the rows (of sample 0) are appended to the context cache.
            let mut in2b = in1.clone();
            step2(&mut in2b);
            for i in 0..layers {
                for kv in ["k", "v"] {
                    let key = format!("cache.{i}.{kv}_ctx");
                    let old = &in1[&key];
                    let (groups, k) = (old.shape[0], old.shape[2]);
                    let rows = &new(i, kv).data;
                    let t = Tensor::from_fn(vec![groups, m_c + 1, k], |ix| {
                        if ix[1] < m_c {
                            old.data[(ix[0] * m_c + ix[1]) * k + ix[2]]
                        } else {
                            rows[ix[0] * k + ix[2]]
                        }
                    });
                    in2b.insert(key, t);
                }
            }
            let out2b = run(&g, &point(b as i64, m_c as i64 + 1, 0), &in2b).unwrap_or_else(|e| panic!("{name}: {e}"));
            let (a, c) = (&out2a["logits"], &out2b["logits"]);
            assert_eq!(a.shape, c.shape);
            let diff = a.data.iter().zip(&c.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "{name}: logits differ by {diff}");
            assert!(a.data.iter().all(|x| x.is_finite()), "{name}: non-finite logits");
        }

        fn small_gpt(edits: &[(&str, serde_json::Value)]) -> String {
            let mut v: serde_json::Value = serde_json::from_str(&config("gpt2")).unwrap();
            for (k, x) in [
                ("n_embd", 32.into()),
                ("n_head", 4.into()),
                ("n_layer", 2.into()),
                ("vocab_size", 64.into()),
                ("n_positions", 16.into()),
            ]
            .iter()
            .chain(edits)
            {
                v[*k] = x.clone();
            }
            v.to_string()
        }

        #[test]
        fn llama_gqa() {
            check("tiny", &config("tiny"));
        }

        #[test]
        fn llama_mha_and_mqa_with_biases() {
            check("tiny mha", &tiny_with(&[("num_key_value_heads", 4.into()), ("attention_bias", true.into())]));
            check("tiny mqa", &tiny_with(&[("num_key_value_heads", 1.into()), ("model_type", "qwen2".into())]));
        }

        #[test]
        fn gpt2_and_bigcode() {
            check("small gpt2", &small_gpt(&[]));
            check(
                "small bigcode mqa",
                &small_gpt(&[("model_type", "gpt_bigcode".into()), ("multi_query", true.into())]),
            );
            check(
                "small bigcode mha",
                &small_gpt(&[("model_type", "gpt_bigcode".into()), ("multi_query", false.into())]),
            );
        }
    }

    mod multi_level {
        //! Multi-level sharing: `P` prompts of `S` samples share a system
        //! prompt; each prompt's samples share its context. Keys are
        //! `concat([broadcast(sys), repeat_S(ctx), dec, new], 2)`.

        use super::*;
        use bifurc::inspect::{find_sites, ShapePoint};
        use bifurc::interp::{random_inputs, run, Tensor};
        use bifurc::optimize::{optimize, Options};
        use std::collections::{BTreeSet, HashMap};

        const MULTI: HfOptions = HfOptions { layers: None, dtype: None, multi_level: true, new_tokens: None };

        fn multi(name: &str) -> Graph {
            graph_with(name, &HfOptions { layers: Some(2), ..MULTI })
        }

        fn point(text: &str) -> BTreeMap<String, i64> {
            ShapePoint::parse(text).unwrap().0
        }

        /// Rows `start..start + count` of the first axis.
        fn rows(t: &Tensor, start: usize, count: usize) -> Tensor {
            let row = t.shape[1..].iter().product::<usize>();
            let mut shape = t.shape.clone();
            shape[0] = count;
            Tensor::new(shape, t.data[start * row..(start + count) * row].to_vec()).unwrap()
        }

        /// `[g, a, k]` and `[g, c, k]` → `[g, a + c, k]`.
        fn concat_m(a: &Tensor, c: &Tensor) -> Tensor {
            let (g, ma, mc, k) = (a.shape[0], a.shape[1], c.shape[1], a.shape[2]);
            Tensor::from_fn(vec![g, ma + mc, k], |ix| {
                if ix[1] < ma {
                    a.data[(ix[0] * ma + ix[1]) * k + ix[2]]
                } else {
                    c.data[(ix[0] * mc + ix[1] - ma) * k + ix[2]]
                }
            })
        }

        /// Random inputs at `pt`, positions `m_s + m_c + m_d + j`.
        fn inputs(g: &Graph, pt: &BTreeMap<String, i64>, seed: u64) -> HashMap<String, Tensor> {
            let mut ins = random_inputs(g, pt, seed).unwrap();
            let batch = (pt["P"] * pt["S"]) as usize;
            let base = pt["m_s"] + pt["m_c"] + pt["m_d"];
            let pos: Vec<i64> = (0..batch).map(|_| base).collect();
            ins.insert("positions".into(), Tensor::from_ints(vec![batch, 1], &pos).unwrap());
            ins
        }

        fn close(name: &str, a: &Tensor, b: &Tensor) {
            a.check_close(b, 1e-4, 1e-5).unwrap_or_else(|e| panic!("{name}: {e}"));
        }

        #[test]
        fn graph_has_system_prompt_and_per_prompt_caches() {
            let g = graph_with("multilevel", &MULTI);
            assert_eq!(g.dims.runtime, ["P", "S", "m_s", "m_c", "m_d"]);
            assert_eq!(g.meta["sharing"], "multi-level");
            assert!(!graph("tiny").meta.contains_key("sharing"));
            for (name, want) in [
                ("token_ids", "[P*S, n]"),
                ("positions", "[P*S, n]"),
                ("cache.1.k_sys", "[g, m_s, k]"),
                ("cache.1.v_sys", "[g, m_s, k]"),
                ("cache.1.k_ctx", "[P, g, m_c, k]"),
                ("cache.1.v_dec", "[P*S, g, m_d, k]"),
                ("causal_mask", "[n, m_c+m_d+m_s+n]"),
                ("l1.attn.k_sys_b", "[P*S, g, m_s, k]"),
                ("l1.attn.k_ctx_grouped", "[P, 1, g, m_c, k]"),
                ("l1.attn.k_ctx_expanded", "[P, S, g, m_c, k]"),
                ("l1.attn.v_ctx_b", "[P*S, g, m_c, k]"),
                ("l1.attn.k_all", "[P*S, g, m_c+m_d+m_s+n, k]"),
                ("l1.attn.v_rep", "[P*S, h, m_c+m_d+m_s+n, k]"),
                ("l1.attn.scores", "[P*S, h, n, m_c+m_d+m_s+n]"),
                ("l1.attn.merged", "[P*S, n, h*k]"),
                ("logits", "[P*S, n, vocab]"),
            ] {
                assert_eq!(shape_of(&g, name), want, "{name}");
            }
            let size = |s: &str| bifurc::ir::Poly::parse(s).unwrap();
            let Some(Value::Node(mask)) = g.find("causal_mask") else { panic!() };
            assert_eq!(
                g.nodes[mask].op,
                Op::CausalMask { query: size("n"), key: size("m_s+m_c+m_d+n"), offset: size("m_s+m_c+m_d") }
            );
            // Each layer's K and V: concat of the system part, the per-prompt
            // part, the decode cache and the new rows.
            for i in 0..g.layers() {
                for kv in ["k", "v"] {
                    let Some(Value::Node(all)) = g.find(&format!("l{i}.attn.{kv}_all")) else { panic!() };
                    let names: Vec<&str> = g.nodes[all].inputs.iter().map(|&v| g.name_of(v)).collect();
                    assert_eq!(
                        names,
                        [
                            format!("l{i}.attn.{kv}_sys_b"),
                            format!("l{i}.attn.{kv}_ctx_b"),
                            format!("cache.{i}.{kv}_dec"),
                            format!("l{i}.attn.{kv}_new"),
                        ]
                    );
                }
            }
            // The sites finder sees both caches of every layer.
            let contexts: BTreeSet<&str> = find_sites(&g).iter().map(|s| g.inputs[s.context].name.as_str()).collect();
            let want: BTreeSet<&str> =
                g.inputs.iter().filter(|i| matches!(i.role, Role::ContextKv { .. })).map(|i| i.name.as_str()).collect();
            assert_eq!(want.len(), 2 * 2 * g.layers());
            assert_eq!(contexts, want);
        }

        #[test]
        fn every_family_builds_multi_level() {
            for name in ["gpt2", "starcoder", "santacoder", "llama-2-7b", "qwen2-7b"] {
                let g = graph_with(name, &HfOptions { layers: Some(1), ..MULTI });
                assert_eq!(shape_of(&g, "l0.attn.k_all"), "[P*S, g, m_c+m_d+m_s+n, k]", "{name}");
                assert_eq!(find_sites(&g).len(), 4, "{name}");
            }
        }

        /// For each prompt `p`, its `S` rows compute what the single-level
        /// graph computes with `b = S` and the context `concat(sys, ctx[p])`.
        #[test]
        fn matches_single_level_per_prompt() {
            let ml = multi("multilevel");
            let single = graph("tiny");
            let (p_count, s_count, m_s, m_c, m_d) = (2usize, 3usize, 4i64, 3i64, 2i64);
            let pt = point(&format!("P={p_count},S={s_count},m_s={m_s},m_c={m_c},m_d={m_d}"));
            let ins = inputs(&ml, &pt, 7);
            let out = run(&ml, &pt, &ins).unwrap();
            let single_pt = point(&format!("b={s_count},m_c={},m_d={m_d}", m_s + m_c));
            for p in 0..p_count {
                let first = p * s_count;
                let mut sin: HashMap<String, Tensor> = ins
                    .iter()
                    .filter(|(name, _)| single.find(name).is_some())
                    .map(|(name, t)| (name.clone(), t.clone()))
                    .collect();
                for name in ["token_ids", "positions"] {
                    sin.insert(name.into(), rows(&ins[name], first, s_count));
                }
                for i in 0..ml.layers() {
                    for kv in ["k", "v"] {
                        let sys = &ins[&format!("cache.{i}.{kv}_sys")];
                        let ctx = rows(&ins[&format!("cache.{i}.{kv}_ctx")], p, 1);
                        let ctx = Tensor::new(ctx.shape[1..].to_vec(), ctx.data).unwrap();
                        sin.insert(format!("cache.{i}.{kv}_ctx"), concat_m(sys, &ctx));
                        let dec = format!("cache.{i}.{kv}_dec");
                        sin.insert(dec.clone(), rows(&ins[&dec], first, s_count));
                    }
                }
                let sout = run(&single, &single_pt, &sin).unwrap();
                assert_eq!(sout.len(), out.len());
                for (name, t) in &sout {
                    close(&format!("prompt {p}: {name}"), &rows(&out[name], first, s_count), t);
                }
            }
            // The prompts differ, so the check above is not vacuous.
            let logits = &out["logits"];
            assert!(rows(logits, 0, 1).check_close(&rows(logits, s_count, 1), 1e-3, 1e-3).is_err());
        }

        #[test]
        fn optimizer_reads_each_level_once() {
            let g = multi("multilevel");
            let opts =
                Options { point: ShapePoint::parse("P=4,S=8,m_s=64,m_c=32,m_d=4").unwrap(), ..Default::default() };
            let opt = optimize(&g, &opts).unwrap();
            let report = &opt.report;
            assert_eq!(report.sites.len(), 4 * g.layers(), "{}", report.render());
            assert!(report.sites.iter().all(|s| s.rewritten), "{}", report.render());
            let (p, gk, m_s, m_c) = (4.0, (2 * 16) as f64, 64.0, 32.0);
            for s in &report.sites {
                let once = if s.context.ends_with("_sys") { gk * m_s * 4.0 } else { p * gk * m_c * 4.0 };
                assert_eq!(s.bytes_after, once, "{}: {}", s.context, report.render());
                assert!(s.bytes_before > s.bytes_after, "{}", s.context);
            }
            assert!(find_sites(&opt.graph).is_empty());

            // The rewritten graph computes what the original does (at any point).
            let small = point("P=2,S=3,m_s=5,m_c=4,m_d=2");
            let ins = inputs(&g, &small, 3);
            let want = run(&g, &small, &ins).unwrap();
            let got = run(&opt.graph, &small, &ins).unwrap();
            for (name, t) in &want {
                close(name, &got[name], t);
            }
        }

        #[test]
        fn optimized_at_a_small_point_is_equivalent() {
            let g = multi("multilevel");
            let text = "P=2,S=3,m_s=5,m_c=4,m_d=2";
            let opt = optimize(&g, &Options { point: ShapePoint::parse(text).unwrap(), ..Default::default() }).unwrap();
            let small = point(text);
            let ins = inputs(&g, &small, 5);
            let want = run(&g, &small, &ins).unwrap();
            let got = run(&opt.graph, &small, &ins).unwrap();
            for (name, t) in &want {
                close(name, &got[name], t);
            }
        }
    }
}
