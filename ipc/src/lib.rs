//! The wire protocol between the CLI, `bulkheadd`, runners and backends.
//!
//! Empty until the control-domain issue lands.
