/// Where something bound to the agent's connections goes, across their
/// generations: page requests go to the urgent connection of the newest
/// generation, and nowhere while it is lost.
///
/// News of a generation arrives from different threads in any order: a
/// receiving thread reports its connection lost while an admission thread
/// is already handing over the next generation's. Each change says which
/// generation it is about, and news older than the generation in use
/// changes nothing. So a loss reported late cannot undo the rejoin that
/// came before it, whatever the interleaving — the order is in the values,
/// not in a lock held across the two.
public struct GenerationGate<Target>: Sendable where Target: Sendable {
    /// Where things go now; nil while the generation in use is lost, or for good.
    public private(set) var target: Target?
    /// The generation `target` belongs to (or belonged to).
    public private(set) var generation: UInt64
    /// Closed for good: nothing opens it again.
    public private(set) var isShut = false

    /// Closed, waiting for generation `generation` or a newer one.
    public init(generation: UInt64 = 0) {
        self.generation = generation
    }

    /// The connections of `generation` carry things from now on. Refused
    /// (false) for a generation older than the one in use, or once shut.
    @discardableResult
    public mutating func open(_ target: Target, generation: UInt64) -> Bool {
        guard !isShut, generation >= self.generation else { return false }
        self.target = target
        self.generation = generation
        return true
    }

    /// The connections of generation `lost` are gone. Closes the gate if
    /// they are the ones in use (true); news of an older generation, whose
    /// successor is already open, changes nothing (false).
    @discardableResult
    public mutating func close(lost: UInt64) -> Bool {
        guard lost >= generation, target != nil else { return false }
        target = nil
        return true
    }

    /// Closed for good (the migration is over): nothing opens it again.
    public mutating func shut() {
        target = nil
        isShut = true
    }
}
