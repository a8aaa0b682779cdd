/// Which transport carries transfers to a peer (NIXL calls them backends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Tcp,
    Ucx,
}

impl TransportKind {
    /// Its name in metadata (endpoints and region keys).
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Ucx => "ucx",
        }
    }
}
