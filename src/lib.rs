#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use backline_core::*;

/// The in-memory provider (feature `memory`, on by default): nothing survives a restart.
#[cfg(feature = "memory")]
pub mod memory {
    pub use backline_memory::*;
}

#[cfg(feature = "memory")]
pub use backline_memory::MemoryBackend;
