//! The compiler's middle: passes that rewrite an `ir::Graph` into fused ops, and the
//! [`PassManager`] that runs a pipeline of them by name, verifying the graph after every pass.
//! [`memory::plan`] then schedules the graph into a [`bitnetc_ir::plan::Plan`] whose
//! activations live at fixed offsets in one arena.

pub mod fuse;
pub mod memory;
pub mod simplify;

use bitnetc_ir::graph::{Graph, IrError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A graph rewrite: small, named and deterministic.
pub trait Pass {
    fn name(&self) -> &'static str;
    /// One line on what the pass does.
    fn description(&self) -> &'static str;
    /// Rewrites the graph; returns how many rewrites it made.
    fn run(&self, g: &mut Graph) -> Result<usize, IrError>;
}

/// What passes need from their surroundings: the target that picks weight layouts.
#[derive(Clone)]
pub struct PassConfig {
    pub repack: Arc<dyn fuse::RepackTarget + Send + Sync>,
}

impl Default for PassConfig {
    fn default() -> Self {
        PassConfig {
            repack: Arc::new(fuse::NoRepack),
        }
    }
}

/// Every pass name, in the default pipeline's order.
pub const PASSES: [&str; 9] = [
    "canonicalize",
    "cse",
    "fuse-norm",
    "fuse-horizontal",
    "fuse-glu",
    "fuse-residual",
    "dce",
    "repack",
    "schedule",
];

/// The pass of a name.
pub fn make(name: &str, config: &PassConfig) -> Option<Box<dyn Pass>> {
    Some(match name {
        "canonicalize" => Box::new(simplify::Canonicalize),
        "cse" => Box::new(simplify::Cse),
        "fuse-norm" => Box::new(fuse::FuseNorm),
        "fuse-horizontal" => Box::new(fuse::FuseHorizontal),
        "fuse-glu" => Box::new(fuse::FuseGlu),
        "fuse-residual" => Box::new(fuse::FuseResidual),
        "dce" => Box::new(simplify::Dce),
        "repack" => Box::new(fuse::Repack {
            target: config.repack.clone(),
        }),
        "schedule" => Box::new(memory::Schedule),
        _ => return None,
    })
}

/// A failure of a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass '{name}'; passes are: {}", PASSES.join(", "))]
    UnknownPass { name: String },
    #[error("pass '{name}' is not in the pipeline ({})", pipeline.join(", "))]
    NotInPipeline {
        name: String,
        pipeline: Vec<&'static str>,
    },
    #[error("pass {pass}: {error}")]
    Failed { pass: &'static str, error: IrError },
    #[error("the graph is invalid after pass {pass}: {error}\n--- IR after {pass} ---\n{ir}")]
    Verify {
        pass: &'static str,
        error: IrError,
        ir: String,
    },
    #[error("the graph is invalid before any pass: {0}")]
    Input(IrError),
}

/// Which passes print the graph after they run.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum PrintAfter {
    #[default]
    None,
    All,
    Passes(Vec<String>),
}

/// What a pipeline run reports as it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum PassEvent {
    /// The graph after a pass, in the text form.
    Printed { pass: &'static str, ir: String },
    /// A pass finished.
    Ran {
        pass: &'static str,
        rewrites: usize,
        elapsed: Duration,
    },
}

/// Runs passes by name, verifying after each.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    pub print_after: PrintAfter,
    pub stop_after: Option<String>,
}

impl PassManager {
    /// A pipeline of the named passes, in the given order.
    pub fn new(names: &[&str], config: &PassConfig) -> Result<PassManager, PassError> {
        let passes = names
            .iter()
            .map(|n| {
                make(n, config).ok_or_else(|| PassError::UnknownPass {
                    name: n.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(PassManager {
            passes,
            print_after: PrintAfter::None,
            stop_after: None,
        })
    }

    /// The default pipeline.
    pub fn default_pipeline(config: &PassConfig) -> PassManager {
        PassManager::new(&PASSES, config).expect("every pass is registered")
    }

    /// Appends a pass (one of this crate's or any other).
    pub fn push(&mut self, pass: Box<dyn Pass>) {
        self.passes.push(pass);
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs the pipeline; `on_event` sees printed IR and timings. Stops after `stop_after`.
    pub fn run(&self, g: &mut Graph, mut on_event: impl FnMut(PassEvent)) -> Result<(), PassError> {
        let in_pipeline = |n: &str| self.passes.iter().any(|p| p.name() == n);
        let named: Vec<&String> = match &self.print_after {
            PrintAfter::Passes(names) => names.iter().chain(&self.stop_after).collect(),
            _ => self.stop_after.iter().collect(),
        };
        if let Some(n) = named.into_iter().find(|n| !in_pipeline(n)) {
            return Err(if PASSES.contains(&n.as_str()) {
                PassError::NotInPipeline {
                    name: n.clone(),
                    pipeline: self.pass_names(),
                }
            } else {
                PassError::UnknownPass { name: n.clone() }
            });
        }
        bitnetc_ir::verify::verify(g).map_err(PassError::Input)?;
        for pass in &self.passes {
            let started = Instant::now();
            let rewrites = pass.run(g).map_err(|error| PassError::Failed {
                pass: pass.name(),
                error,
            })?;
            let elapsed = started.elapsed();
            if let Err(error) = bitnetc_ir::verify::verify(g) {
                let ir =
                    bitnetc_ir::text::print(g).unwrap_or_else(|e| format!("<cannot print: {e}>"));
                return Err(PassError::Verify {
                    pass: pass.name(),
                    error,
                    ir,
                });
            }
            on_event(PassEvent::Ran {
                pass: pass.name(),
                rewrites,
                elapsed,
            });
            let print = match &self.print_after {
                PrintAfter::None => false,
                PrintAfter::All => true,
                PrintAfter::Passes(names) => names.iter().any(|n| n == pass.name()),
            };
            if print {
                let ir = bitnetc_ir::text::print(g).map_err(|error| PassError::Failed {
                    pass: pass.name(),
                    error,
                })?;
                on_event(PassEvent::Printed {
                    pass: pass.name(),
                    ir,
                });
            }
            if self.stop_after.as_deref() == Some(pass.name()) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnetc_ir::op::Op;

    const TEXT: &str = "%0 = input \"tokens\" : i32[T]\n%1 = weight \"e\" : f16[10,4]\n%2 = embed %0, %1 : f32[T,4]\n%3 = act %2 {act=silu} : f32[T,4]\noutput \"logits\" %3\n";

    /// A pass that breaks the graph: it turns `act` into `quant_act` without changing types.
    struct Breaks;

    impl Pass for Breaks {
        fn name(&self) -> &'static str {
            "breaks"
        }

        fn description(&self) -> &'static str {
            "produces an invalid graph"
        }

        fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
            let ids: Vec<_> = g
                .node_ids()
                .filter(|&n| matches!(g.node(n).op, Op::Act { .. }))
                .collect();
            for n in &ids {
                g.set_op(*n, Op::QuantAct);
            }
            Ok(ids.len())
        }
    }

    #[test]
    fn a_pass_that_breaks_the_graph_is_named_with_its_ir() {
        let mut g = bitnetc_ir::text::parse(TEXT).unwrap();
        let mut pm = PassManager::new(&["dce"], &PassConfig::default()).unwrap();
        pm.push(Box::new(Breaks));
        let err = pm.run(&mut g, |_| {}).unwrap_err().to_string();
        assert!(
            err.starts_with("the graph is invalid after pass breaks: quant_act:"),
            "{err}"
        );
        assert!(err.contains("--- IR after breaks ---\n%0 = input"), "{err}");
        assert!(err.contains("= quant_act %2 : f32[T,4]"), "{err}");
    }

    #[test]
    fn events_report_each_pass() {
        let mut g = bitnetc_ir::text::parse(TEXT).unwrap();
        let mut pm = PassManager::default_pipeline(&PassConfig::default());
        pm.print_after = PrintAfter::Passes(vec!["cse".into()]);
        pm.stop_after = Some("fuse-norm".into());
        let mut ran = Vec::new();
        let mut printed = Vec::new();
        pm.run(&mut g, |e| match e {
            PassEvent::Ran { pass, .. } => ran.push(pass),
            PassEvent::Printed { pass, .. } => printed.push(pass),
        })
        .unwrap();
        assert_eq!(ran, ["canonicalize", "cse", "fuse-norm"]);
        assert_eq!(printed, ["cse"]);
    }
}
