//! warmpool keeps warm pools of clean, single-use guests for CI jobs on libvirt and QEMU.
//!
//! A pool's slots are booted once, snapshotted while idle, handed one job each, and restored
//! from their clean snapshot after every job. The modules follow the words of the design:
//! [`config`] reads the host configuration, [`hypervisor`] is the VM backend boundary,
//! [`disk`] handles overlays, [`guest`] speaks the job-port protocol, [`slot`] is the slot state
//! machine, [`pool`] hands jobs to slots, [`scheduler`] shares slots among tenants' demand,
//! [`provider`] turns CI services' jobs into demand and runners, [`control`] serves local jobs
//! over a unix socket, [`api`] serves the admin API, webhooks, health and metrics over HTTP,
//! [`store`] keeps tenants, secrets, tokens, jobs and the audit log in SQLite, and [`daemon`]
//! ties them together for `warmpool serve`.

pub mod api;
pub mod bench;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod guest;
pub mod hypervisor;
pub mod local;
pub mod metrics;
pub mod network;
pub mod pool;
pub mod provider;
pub mod scheduler;
pub mod service;
pub mod slot;
pub mod store;
pub mod template;
