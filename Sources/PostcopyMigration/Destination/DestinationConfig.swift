import PostcopyCore
import PostcopyOS

/// How a daemon instance serves its one incoming migration.
public struct DestinationConfig: Sendable {
    /// The instance's name (systemd's %i), in every journal record.
    public var instance = "default"
    /// Where the agent connects (port 0: any free port, reported when listening).
    public var listen: SocketEndpoint
    /// How the agent's connections are protected: TLS with the agent's
    /// certificate checked, or plaintext (an explicit choice).
    public var transport: TransportSecurity
    /// The VMM's unix socket, created 0600.
    public var vmmSocketPath: String
    public var memory: MemoryKind
    /// For hugetlbfs: the mount to create the RAM file in (default: the
    /// first 2 MiB mount, else a MFD_HUGETLB memfd).
    public var hugetlbfsDirectory: String?
    /// Create guest RAM as a file at this path (tmpfs for shmem, hugetlbfs
    /// for hugetlbfs) that a VMM can open by name, instead of a memfd or an
    /// unlinked file; it is removed when the daemon exits.
    public var ramFile: String?
    public var regionSize: UInt64
    /// The only uid allowed to attach as the VMM.
    public var vmmUID: UInt32
    /// The migration to accept; nil accepts the first HELLO's.
    public var migrationID: MigrationID?
    /// The secret every HELLO must carry; nil binds the migration to the
    /// first HELLO's.
    public var migrationSecret: MigrationSecret?
    /// How long SWITCHOVER waits for a VMM that has not attached yet.
    public var vmmAttachTimeoutNanos: UInt64 = 30_000_000_000
    /// How long the daemon waits for the VMM to acknowledge completion.
    public var vmmCompleteTimeoutNanos: UInt64 = 30_000_000_000
    /// How long a new agent connection may take for its TLS handshake, and
    /// then for its HELLO.
    public var handshakeTimeoutNanos: UInt64 = 10_000_000_000
    /// How long a VMM connection may take from connecting to VMM_ATTACH (or
    /// to VMM_REATTACH) before it is refused and closed; the daemon then
    /// goes on waiting for the VMM.
    public var vmmHandshakeTimeoutNanos: UInt64 = 10_000_000_000
    /// Agent connections allowed in their handshake at once; past that the
    /// oldest is given up for the newest, so that no peer can make the
    /// daemon hold unbounded threads or memory.
    public var maxPendingConnections = 4
    public var keepAlive = KeepAlive()
    /// An agent connection that carries nothing (not even HEARTBEAT, which
    /// the agent sends every quarter of this) for this long is dead: during
    /// postcopy the migration pauses, before it fails.
    public var deadPeerTimeoutNanos: UInt64 = 5_000_000_000
    /// How long a paused postcopy waits for the agent to rejoin before it
    /// fails (the guest then lacks its stale pages).
    public var reconnectTimeoutNanos: UInt64 = 600_000_000_000
    /// A guest thread blocked on a stale page longer than this is logged
    /// (POSTCOPYD_FAULT_STALLED, at most once a second).
    public var stallWarningNanos: UInt64 = 100_000_000
    /// Where to write the postcopy phase's events (`PostcopyTrace.csv`) once
    /// the migration completes; nil records nothing.
    public var tracePath: String?
    /// How the thread that receives the background stream competes for a
    /// CPU during postcopy (see `OSThread.SchedulingClass`).
    public var backgroundScheduling = OSThread.SchedulingClass.backgroundDefault

    public init(listen: SocketEndpoint, transport: TransportSecurity, vmmSocketPath: String, memory: MemoryKind, hugetlbfsDirectory: String? = nil,
                regionSize: UInt64, vmmUID: UInt32, migrationID: MigrationID? = nil) {
        self.listen = listen
        self.transport = transport
        self.vmmSocketPath = vmmSocketPath
        self.memory = memory
        self.hugetlbfsDirectory = hugetlbfsDirectory
        self.regionSize = regionSize
        self.vmmUID = vmmUID
        self.migrationID = migrationID
    }
}
