//! Compile-fail tests for the derives: each case in `cases/` holds exactly one mistake,
//! and its `.stderr` pins the single error the derive reports for it, at the offending
//! tokens.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("cases/*.rs");
}
