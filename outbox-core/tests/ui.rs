//! Compile-time behaviour of `#[derive(OutboxEvent)]`: accepted forms, and one precise error
//! for each kind of mistake (snapshots in `tests/ui/fail/*.stderr`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
