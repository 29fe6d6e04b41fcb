//! Shared by the `idgraphctl` tests: what a run printed, or why it failed.

#![allow(dead_code)]

use std::process::Output;

/// The standard output of a run that succeeded.
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The standard error of a run that was refused.
pub fn refused(out: Output) -> String {
    assert!(!out.status.success(), "expected a refusal, got {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}
