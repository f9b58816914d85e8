import CSystemd

/// libsystemd, one method per call.
public enum Systemd {
    /// Whether the system was booted with systemd as its init.
    /// libsystemd: `sd_booted(3)`
    public static var isBooted: Bool { sd_booted() > 0 }
}
