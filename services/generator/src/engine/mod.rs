//! The generation engine: one thread per device owns the resident models and runs continuous
//! batching with a KV cache; async code talks to it through [`EngineHandle`].

mod api;
mod batch;
mod handle;
mod models;
mod sequence;
pub mod stop;
mod worker;

pub use api::{
    Admitted, EngineConfig, EngineMetrics, EngineRequest, ModelSummary, ResidentModel, SeqEvent,
    SubmitError,
};
pub use handle::{spawn_engine, EngineHandle};
