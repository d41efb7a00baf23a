//! Errors name what is wrong; random inputs are deterministic and fit the
//! graph.

use super::attention::ATTENTION;
use super::{op_graph, point, t};
use bifurc::interp::{random_inputs, run, InterpError, Tensor};
use std::collections::{BTreeMap, HashMap};

#[test]
fn interp_errors_name_what_is_wrong() {
    let g = bifurc::import::parse(&op_graph(&[("table", "[3, 2]", "f32"), ("ids", r#"["m"]"#, "i32")], "gather", "{}"))
        .expect("graph");
    let table = t(&[3, 2], &[0.; 6]);
    let ins = |ids: Tensor| HashMap::from([("table".to_string(), table.clone()), ("ids".to_string(), ids)]);
    let p = point(&[("m", 2)]);

    let only_table = HashMap::from([("table".to_string(), table.clone())]);
    match run(&g, &p, &only_table) {
        Err(InterpError::MissingInput { name }) => assert_eq!(name, "ids"),
        other => panic!("{other:?}"),
    }

    let e = run(&g, &p, &ins(t(&[3], &[0., 1., 2.]))).expect_err("wrong shape");
    assert!(
        matches!(&e, InterpError::InputShape { name, expected, got, .. }
        if name == "ids" && expected == &vec![2] && got == &vec![3]),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("[3]") && msg.contains("[2]") && msg.contains("[m]"), "{msg}");

    match run(&g, &p, &ins(t(&[2], &[1., 3.]))) {
        Err(InterpError::GatherId { node, index, id, rows }) => {
            assert_eq!((node.as_str(), index, id, rows), ("out", 1, 3., 3))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(run(&g, &p, &ins(t(&[2], &[-1., 0.]))), Err(InterpError::GatherId { .. })));
    assert!(matches!(run(&g, &p, &ins(t(&[2], &[0.5, 0.]))), Err(InterpError::NotInteger { index: 0, .. })));

    let good = ins(t(&[2], &[2., 0.]));
    assert!(run(&g, &p, &good).is_ok());
    assert!(matches!(run(&g, &BTreeMap::new(), &good), Err(InterpError::MissingDim { dim, .. }) if dim == "m"));
    assert!(matches!(run(&g, &point(&[("m", -1)]), &good), Err(InterpError::NegativeDim { .. })));
    let short = HashMap::from([
        ("table".to_string(), Tensor { shape: vec![3, 2], data: vec![0.; 5] }),
        ("ids".to_string(), t(&[2], &[0., 0.])),
    ]);
    assert!(matches!(run(&g, &p, &short), Err(InterpError::TensorLength { .. })));
    assert!(matches!(run(&g, &point(&[("m", i64::MAX)]), &good), Err(InterpError::TooLarge { .. })));
}

#[test]
fn interp_random_inputs_are_deterministic_per_seed() {
    let g = bifurc::import::parse(ATTENTION).expect("attention graph");
    let p = point(&[("b", 3), ("m_c", 5), ("m_d", 4)]);
    let a = random_inputs(&g, &p, 7).expect("inputs");
    assert_eq!(a, random_inputs(&g, &p, 7).expect("inputs"));
    let b = random_inputs(&g, &p, 8).expect("inputs");
    for name in ["q", "k_c", "v_d"] {
        assert_ne!(a[name].data, b[name].data, "{name}");
        assert!(a[name].data.iter().all(|v| (-1.0..1.0).contains(v)));
    }
    assert_ne!(a["q"].data, a["k_new"].data, "each input has its own stream");
}

#[test]
fn interp_random_token_ids_and_positions_fit_the_graph() {
    let g = bifurc::import::parse(include_str!("ids_positions.json")).expect("graph");
    let p = point(&[("b", 40), ("m_c", 100), ("m_d", 7)]);
    let ins = random_inputs(&g, &p, 3).expect("inputs");
    let ids = &ins["tokens"].data;
    assert!(ids.iter().all(|&v| v.fract() == 0.0 && (0.0..5.0).contains(&v)));
    assert!(ids.contains(&4.0), "ids span the table's rows");
    assert_eq!(ins["pos"].get(&[39, 2]), Some(109.0));
    assert_eq!(ins["pos"].get(&[0, 0]), Some(107.0));
    assert!(run(&g, &p, &ins).is_ok());
}
