//! Lowering to MLIR (melior, LLVM/MLIR 22).
