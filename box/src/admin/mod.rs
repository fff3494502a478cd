//! The admin tool's commands (`edge-outbox <command>`), one file each: [`verify`]
//! checks the cross-service invariants of a drained box, [`run_all`] runs the box in
//! one terminal, [`demo_offline`] walks through offline first, [`cluster_demo`] through
//! a NATS cluster losing a node and a host, [`power_cut`] runs the
//! box through power cuts or kills under load and then checks it, [`mark_restored`]
//! begins a new producer epoch in a database restored from a backup. [`broker_access`]
//! prepares the broker's passwords and ACL for all three. [`operate`] holds the
//! commands for the day something goes wrong: status, dead-letters, replay, outbox list.

pub mod broker_access;
pub mod cluster_demo;
pub mod demo_offline;
pub mod mark_restored;
pub mod operate;
pub mod power_cut;
pub mod run_all;
pub mod verify;
