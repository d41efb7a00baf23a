//! MLIR context set-up and pass-pipeline plumbing.

use std::sync::{Arc, Mutex, Once, PoisonError};

use melior::{
    diagnostic::{Diagnostic, DiagnosticHandlerId, DiagnosticSeverity},
    dialect::DialectRegistry,
    ir::{operation::OperationLike, Module},
    pass::PassManager,
    utility::{parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes},
    Context,
};

use super::LowerError;

/// A fresh MLIR context with all upstream dialects loaded, all passes
/// registered (process-wide, once) and all LLVM IR translations registered
/// (needed by `gpu-module-to-binary` and the execution engine).
pub fn new_context() -> Context {
    static PASSES: Once = Once::new();
    // mlirRegisterAllPasses must run once per process (a second call double-frees).
    PASSES.call_once(register_all_passes);

    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    context
}

/// Collects MLIR diagnostics emitted on a context while it is alive, instead
/// of letting MLIR print them to stderr. Detaches itself on drop.
pub struct DiagnosticCapture<'c> {
    context: &'c Context,
    id: DiagnosticHandlerId,
    messages: Arc<Mutex<Vec<String>>>,
}

impl<'c> DiagnosticCapture<'c> {
    /// Starts capturing diagnostics on `context`.
    pub fn attach(context: &'c Context) -> Self {
        // Arc/Mutex: MLIR may report diagnostics from its worker threads.
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&messages);
        let id = context.attach_diagnostic_handler(move |diagnostic| {
            let text = render(&diagnostic);
            sink.lock().unwrap_or_else(PoisonError::into_inner).push(text);
            true
        });
        Self { context, id, messages }
    }

    /// Takes the diagnostics captured so far, one per line.
    pub fn take(&self) -> String {
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *messages).join("\n")
    }
}

impl Drop for DiagnosticCapture<'_> {
    fn drop(&mut self) {
        self.context.detach_diagnostic_handler(self.id);
    }
}

fn render(diagnostic: &Diagnostic) -> String {
    let severity = match diagnostic.severity() {
        DiagnosticSeverity::Error => "error",
        DiagnosticSeverity::Warning => "warning",
        DiagnosticSeverity::Note => "note",
        DiagnosticSeverity::Remark => "remark",
    };
    let mut text = format!("{}: {severity}: {diagnostic}", diagnostic.location());
    for index in 0..diagnostic.note_count() {
        if let Ok(note) = diagnostic.note(index) {
            text.push_str(&format!("\n  note: {note}"));
        }
    }
    text
}

/// Verifies `module`; `stage` names the point in the flow for the error.
pub fn verify(context: &Context, module: &Module, stage: &str) -> Result<(), LowerError> {
    let capture = DiagnosticCapture::attach(context);
    if module.as_operation().verify() {
        Ok(())
    } else {
        Err(LowerError::Verify { stage: stage.to_owned(), diagnostics: capture.take() })
    }
}

/// Parses a textual pass pipeline anchored on the module, e.g.
/// `builtin.module(convert-func-to-llvm,reconcile-unrealized-casts)`, runs it
/// on `module` with the pass manager's verifier on, and verifies the result.
pub fn run_pipeline(context: &Context, module: &mut Module, pipeline: &str) -> Result<(), LowerError> {
    let manager = PassManager::new(context);
    manager.enable_verifier(true);
    parse_pass_pipeline(manager.as_operation_pass_manager(), pipeline).map_err(|error| LowerError::ParsePipeline {
        pipeline: pipeline.to_owned(),
        message: match error {
            melior::Error::ParsePassPipeline(message) => message,
            other => other.to_string(),
        },
    })?;

    let capture = DiagnosticCapture::attach(context);
    manager
        .run(module)
        .map_err(|_| LowerError::RunPipeline { pipeline: pipeline.to_owned(), diagnostics: capture.take() })?;
    drop(capture);

    verify(context, module, &format!("after `{pipeline}`"))
}
