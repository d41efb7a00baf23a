//! Kernels with the same code, found on the emitted text.
//!
//! Layer after layer of a model, the kernels differ only in their name and
//! in the buffers passed to them: a kernel's pointer parameters are named
//! after their buffer (`%b25`), everything else is numbered within the
//! kernel. [`code_key`] renames each pointer parameter after its position
//! in the signature and blanks the name; kernels with equal keys are the
//! same function up to a renaming of their parameters (alpha-equivalent),
//! so one compiled entry runs all of them, each launched with its own
//! arguments. Found before parsing, this lets the GPU compile parse about
//! 20 kernels of a 32-layer model instead of about 770
//! ([`crate::lower::gpu::to_shared_ptx`] then still merges, on the parsed
//! code, whatever the text kept apart), and the CPU JIT compile each
//! distinct kernel once ([`crate::lower::CpuStep`]).

use std::collections::{BTreeMap, HashMap};

use crate::lower::plan::{Kernel, Param};

/// `text` (kernel `kernel`'s emitted function) with its name blanked and
/// every pointer parameter `%b{buffer}` renamed `%b~{position}` (a name
/// no emitted text has, so the renaming cannot meet another name).
pub(super) fn code_key(kernel: &Kernel, text: &str) -> String {
    let position: HashMap<usize, usize> = kernel
        .params
        .iter()
        .enumerate()
        .filter_map(|(n, p)| match p {
            Param::Buffer(b) => Some((*b, n)),
            _ => None,
        })
        .collect();
    let text = text.replacen(&format!("@{}(", kernel.name), "@(", 1);
    let mut key = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("%b") {
        key.push_str(&rest[..at + 2]);
        rest = &rest[at + 2..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let whole = !rest[digits..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        match rest[..digits].parse::<usize>().ok().filter(|_| whole).and_then(|b| position.get(&b)) {
            Some(n) => {
                key.push('~');
                key.push_str(&n.to_string());
            }
            None => key.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    key.push_str(rest);
    key
}

/// For each kernel (name, [`code_key`]), the first kernel with its key.
pub(super) fn first_with_same_code<'a>(
    kernels: impl IntoIterator<Item = (&'a str, String)>,
) -> BTreeMap<String, String> {
    let mut first: HashMap<String, &str> = HashMap::new();
    let mut entries = BTreeMap::new();
    for (name, key) in kernels {
        let entry = *first.entry(key).or_insert(name);
        entries.insert(name.to_string(), entry.to_string());
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Poly;

    fn kernel(name: &str, buffers: &[usize]) -> Kernel {
        let mut params = vec![Param::Dim("b".into())];
        params.extend(buffers.iter().map(|b| Param::Buffer(*b)));
        Kernel {
            name: name.into(),
            node: "n".into(),
            op: "add".into(),
            reads: buffers[..buffers.len() - 1].to_vec(),
            writes: buffers[buffers.len() - 1],
            extent: Poly::constant(4),
            cooperative: false,
            warp: false,
            mma: None,
            params,
        }
    }

    fn text(name: &str, [x, y, out]: [usize; 3], body: &str) -> String {
        format!(
            "gpu.func @{name}(%d0: i64, %b{x}: !llvm.ptr, %b{y}: !llvm.ptr, %b{out}: !llvm.ptr) kernel {{\n\
             %bid = gpu.block_id x\n{body}\ngpu.return\n}}\n"
        )
    }

    #[test]
    fn kernels_differing_in_buffers_share_a_key() {
        let body = |x: usize, y: usize, o: usize| {
            format!("%v1 = llvm.load %b{x}\n%v2 = llvm.load %b{y}\nllvm.store %v1, %b{o}")
        };
        let a = code_key(&kernel("k0_l0_add", &[3, 7, 9]), &text("k0_l0_add", [3, 7, 9], &body(3, 7, 9)));
        let b = code_key(&kernel("k5_l1_add", &[12, 30, 4]), &text("k5_l1_add", [12, 30, 4], &body(12, 30, 4)));
        assert_eq!(a, b);
        assert!(a.contains("@(") && a.contains("%bid") && a.contains("%b~1: !llvm.ptr"), "{a}");
        // The same signature, the body reading its parameters the other way round.
        let swapped = code_key(&kernel("k5_l1_add", &[12, 30, 4]), &text("k5_l1_add", [12, 30, 4], &body(30, 12, 4)));
        assert_ne!(a, swapped);
        // Another constant.
        let other = text("k5_l1_add", [12, 30, 4], &body(12, 30, 4)).replace("gpu.block_id x", "gpu.block_id y");
        assert_ne!(a, code_key(&kernel("k5_l1_add", &[12, 30, 4]), &other));
    }

    #[test]
    fn only_whole_parameter_names_are_renamed() {
        let k = kernel("k0", &[1, 2, 3]);
        let key = code_key(&k, "gpu.func @k0(%b1, %b2, %b3) { %b12 %b1_x %b2.y %b3) @k0( }");
        assert_eq!(key, "gpu.func @(%b~1, %b~2, %b~3) { %b12 %b1_x %b2.y %b~3) @k0( }");
        let k = kernel("k0", &[12, 2, 3]);
        let key = code_key(&k, "gpu.func @k0(%b12, %b2, %b3) %b1");
        assert_eq!(key, "gpu.func @(%b~1, %b~2, %b~3) %b1");
    }

    #[test]
    fn entries_map_to_the_first_kernel_with_the_code() {
        let entries = first_with_same_code([("a", "x".to_string()), ("b", "y".to_string()), ("c", "x".to_string())]);
        let pairs: Vec<(&str, &str)> = entries.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("a", "a"), ("b", "b"), ("c", "a")]);
    }
}
