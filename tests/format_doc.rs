//! docs/model-format.md's example must import, round-trip through the
//! exporter, and show the two attention sites the doc promises.

use bifurc::inspect::{inspect, ShapePoint};

fn doc_example() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/model-format.md")).expect("doc exists");
    let start = doc.find("```json\n{").expect("the doc has a complete json example") + "```json\n".len();
    let end = start + doc[start..].find("```").expect("the example block is closed");
    doc[start..end].to_string()
}

#[test]
fn doc_example_imports_and_round_trips() {
    let g = bifurc::import::parse(&doc_example()).expect("the documented example is valid");
    let text = bifurc::export::to_string(&bifurc::export::to_json(&g));
    let again = bifurc::import::parse(&text).expect("exported graph re-imports");
    assert_eq!(g, again);
    assert_eq!(text, bifurc::export::to_string(&bifurc::export::to_json(&again)), "export is deterministic");
}

#[test]
fn doc_example_has_two_sites_and_per_sample_context_reads() {
    let g = bifurc::import::parse(&doc_example()).expect("valid");
    let point = ShapePoint::parse("b=4,m_c=100,m_d=10").expect("point");
    let r = inspect(&g, &point).expect("inspect");
    let names: Vec<&str> = r.sites.iter().map(|s| g.nodes[s.node].id.as_str()).collect();
    assert_eq!(names, ["scores", "attn"]);
    // K and V of the context, read once per sample: 2 * b * g * m_c * k * 4 bytes.
    assert_eq!(r.bytes.context_kv, (2 * 4 * 2 * 100 * 8 * 4) as f64);
    assert_eq!(r.bytes.decode_kv, (2 * 4 * 2 * 10 * 8 * 4) as f64);
    assert_eq!(r.bytes.weights, 0.0);
}
