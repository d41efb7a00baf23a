//! An end-to-end check of the MLIR toolchain: build, verify, lower to LLVM.

use melior::{
    dialect::{arith, func, memref},
    ir::{
        attribute::{IntegerAttribute, StringAttribute, TypeAttribute},
        r#type::{FunctionType, MemRefType},
        Block, BlockLike, Location, Module, Region, RegionLike, Type,
    },
};

use super::{new_context, run_pipeline, verify, LowerError};

/// Pipeline that takes `func`/`arith`/`memref` on static shapes to the `llvm`
/// dialect.
pub const SMOKE_PIPELINE: &str = "builtin.module(finalize-memref-to-llvm,\
convert-arith-to-llvm,convert-func-to-llvm,reconcile-unrealized-casts)";

/// Builds `func.func @add_first(%a: memref<4xf32>, %b: memref<4xf32>) -> f32`
/// returning `a[0] + b[0]` with melior's builders, verifies it, lowers it
/// with [`SMOKE_PIPELINE`] and returns the printed LLVM-dialect module.
pub fn smoke() -> Result<String, LowerError> {
    smoke_with_pipeline(SMOKE_PIPELINE)
}

pub(crate) fn smoke_with_pipeline(pipeline: &str) -> Result<String, LowerError> {
    let context = new_context();
    let location = Location::unknown(&context);
    let mut module = Module::new(location);

    let f32_type = Type::float32(&context);
    let index_type = Type::index(&context);
    let vector_type: Type = MemRefType::new(f32_type, &[4], None, None).into();

    let block = Block::new(&[(vector_type, location), (vector_type, location)]);
    let zero = block.append_operation(arith::constant(&context, IntegerAttribute::new(index_type, 0).into(), location));
    let zero = zero.result(0)?.into();
    let a = block.append_operation(memref::load(block.argument(0)?.into(), &[zero], location));
    let b = block.append_operation(memref::load(block.argument(1)?.into(), &[zero], location));
    let sum = block.append_operation(arith::addf(a.result(0)?.into(), b.result(0)?.into(), location));
    block.append_operation(func::r#return(&[sum.result(0)?.into()], location));

    let region = Region::new();
    region.append_block(block);
    let function_type = FunctionType::new(&context, &[vector_type, vector_type], &[f32_type]);
    module.body().append_operation(func::func(
        &context,
        StringAttribute::new(&context, "add_first"),
        TypeAttribute::new(function_type.into()),
        region,
        &[],
        location,
    ));

    verify(&context, &module, "smoke module as built")?;
    run_pipeline(&context, &mut module, pipeline)?;
    Ok(module.as_operation().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_lowers_to_llvm_dialect() {
        let text = match smoke() {
            Ok(text) => text,
            Err(error) => panic!("smoke failed: {error}"),
        };
        assert!(text.contains("llvm.func @add_first"), "{text}");
        assert!(text.contains("llvm.fadd"), "{text}");
        assert!(!text.contains("func.func"), "{text}");
    }

    #[test]
    fn smoke_is_deterministic() {
        let first = smoke().map_err(|error| error.to_string());
        let second = smoke().map_err(|error| error.to_string());
        assert_eq!(first, second);
    }

    #[test]
    fn unknown_pass_is_an_error() {
        let error = smoke_with_pipeline("builtin.module(no-such-pass)").expect_err("an unknown pass must not parse");
        match &error {
            LowerError::ParsePipeline { pipeline, message } => {
                assert_eq!(pipeline, "builtin.module(no-such-pass)");
                assert!(message.contains("no-such-pass"), "{message}");
            }
            other => panic!("expected ParsePipeline, got {other:?}"),
        }
    }

    #[test]
    fn malformed_pipeline_is_an_error() {
        let error = smoke_with_pipeline("builtin.module(convert-func-to-llvm")
            .expect_err("an unbalanced pipeline must not parse");
        assert!(matches!(error, LowerError::ParsePipeline { .. }), "{error:?}");
    }

    #[test]
    fn pass_on_wrong_anchor_is_an_error() {
        // convert-gpu-to-nvvm only runs on gpu.module: rejected when the
        // pipeline is built, before anything runs.
        let error = smoke_with_pipeline("builtin.module(convert-gpu-to-nvvm)")
            .expect_err("a gpu.module pass must not be added to builtin.module");
        assert!(matches!(error, LowerError::ParsePipeline { .. }), "{error:?}");
    }

    #[test]
    fn failing_pass_reports_diagnostics() {
        // llvm-target-to-data-layout fails at run time on a module without an
        // `llvm.target` attribute; its diagnostic must come back in the error.
        match smoke_with_pipeline("builtin.module(llvm-target-to-data-layout)") {
            Err(LowerError::RunPipeline { diagnostics, .. }) => {
                assert!(diagnostics.contains("llvm.target"), "{diagnostics}");
            }
            other => panic!("expected RunPipeline, got {other:?}"),
        }
    }
}
