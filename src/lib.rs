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

/// The SQL provider (features `sqlite`, `postgres`, `mysql`): [`SqlBackend`]
/// over sqlx, with transactional enqueue.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod sql {
    pub use backline_sql::*;
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use backline_sql::{SqlBackend, SqlConfig};

/// The Redis provider (feature `redis`): [`RedisBackend`](crate::redis::RedisBackend).
#[cfg(feature = "redis")]
pub mod redis {
    pub use backline_redis::*;
}

/// The RabbitMQ provider (feature `rabbitmq`):
/// [`RabbitMqBackend`](crate::rabbitmq::RabbitMqBackend) over lapin.
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use backline_rabbitmq::*;
}
