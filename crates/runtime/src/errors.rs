//! Errors as logs and reports tell them: one line with every cause.

/// An error with its causes, "outer: inner: innermost": the outer message alone often hides what
/// went wrong (hyper's "client error (SendRequest)", reqwest's "error sending request").
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(error), |e| e.source()).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_outermost_first() {
        let e = Outer(Middle(std::io::Error::other("innermost")));
        assert_eq!(chain(&e), "outer: middle: innermost");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
