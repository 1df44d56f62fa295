//! The whole conformance suite against the in-memory provider.

use std::sync::Arc;

use backline_core::Backend;
use backline_memory::MemoryBackend;

struct MemoryHarness;

#[async_trait::async_trait]
impl backline_testkit::Harness for MemoryHarness {
    async fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new())
    }
}

backline_testkit::conformance!(MemoryHarness);
