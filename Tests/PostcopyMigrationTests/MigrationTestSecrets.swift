import PostcopyCore

extension MigrationSecret {
    /// The secret the tests' agents use, unless a test is about secrets.
    static let test = MigrationSecret(bytes: Array(0..<32))!
    /// Another agent's.
    static let other = MigrationSecret(bytes: Array(100..<132))!
}
