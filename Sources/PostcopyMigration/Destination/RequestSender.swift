import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

/// Sends PAGE_REQUESTs on a thread of its own, so that the fault thread
/// never waits on a socket: it only queues the span a fault needs and
/// signals. A full send buffer, or a heartbeat holding the stream's send
/// lock, then delays requests, never the resolution of other faults, clean
/// ones included.
///
/// The queue is a fixed ring made up front: queueing allocates nothing.
/// When it is full (the link is that far behind), the fault only marks the
/// queue overflowed; the sender then asks again for everything the tracker
/// has outstanding (`outstanding`), as a rejoin does, so no request is lost.
/// That needs the caller's half of the contract: a span is marked requested
/// (listed by `outstanding`) before it is queued, as the tracker's `fault`
/// does; the queue is then dropped in favour of the list. Frames are
/// encoded into one buffer kept across sends.
final class RequestSender: @unchecked Sendable {
    // SAFETY (@unchecked): every mutable field is touched with `mutex` held,
    // except `frames`, which only the sending thread uses.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var ring: [PageRun]
    private var head = 0
    private var count = 0
    private var overflowed = false
    private var stopping = false
    /// Where requests go: the urgent connection of the newest generation;
    /// closed while it is lost, shut once postcopy is halted.
    private var gate = GenerationGate<MessageStream>()
    private var stream: MessageStream? { gate.target }
    private var frames: [UInt8] = []
    private var thread: OSThread?
    private let outstanding: @Sendable () -> [PageRun]
    private let nextRequestID: Atomic<UInt32>

    /// Requests the sender may hold before it falls back to asking for
    /// everything outstanding.
    static let capacity = 4096
    /// The most pages one PAGE_REQUEST asks for (a 2 MiB page is 512).
    static let maxPagesPerRequest: UInt64 = 1024

    /// `outstanding` lists every page asked for that has not arrived (the
    /// tracker's, read from its atomic bitmaps). Nothing is sent before `start`.
    init(outstanding: @escaping @Sendable () -> [PageRun]) {
        self.outstanding = outstanding
        nextRequestID = Atomic(0)
        ring = [PageRun](repeating: PageRun(first: 0, count: 1), count: Self.capacity)
        frames.reserveCapacity(64 * 32)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    /// Starts the sending thread; every start needs a `stop`.
    func start() throws {
        let started = try OSThread.start(name: "postcopy-request") { [self] in run() }
        pthread_mutex_lock(mutex)
        thread = started
        pthread_mutex_unlock(mutex)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    /// The highest PAGE_REQUEST id sent so far.
    var lastRequestID: UInt32 { nextRequestID.load(ordering: .relaxed) }

    /// Queues a request for `run` (the fault thread's call): no allocation,
    /// no system call but the wake-up. Dropped while paused: the tracker
    /// keeps it, and a rejoin asks for it again.
    @inline(__always)
    func request(_ run: PageRun) {
        pthread_mutex_lock(mutex)
        if stream != nil {
            if count < ring.count {
                ring[(head + count) % ring.count] = run
                count += 1
            } else {
                overflowed = true
            }
            pthread_cond_signal(condition)
        }
        pthread_mutex_unlock(mutex)
    }

    /// Requests go to `stream`, the urgent connection of `generation`,
    /// from now on, every outstanding request first (a rejoin's guest
    /// threads wait on them). Ignored for a generation older than the one
    /// in use.
    func use(_ newStream: MessageStream, generation: UInt64) {
        pthread_mutex_lock(mutex)
        if gate.open(newStream, generation: generation) {
            count = 0
            overflowed = true
            pthread_cond_signal(condition)
        }
        pthread_mutex_unlock(mutex)
    }

    /// The connections of generation `lost` are gone: requests go nowhere
    /// (what is queued is dropped; the tracker keeps it) until a newer
    /// generation's `use`. Ignored when a newer generation is in use
    /// already: a loss reported late never undoes the rejoin after it.
    func pause(lost: UInt64) {
        pthread_mutex_lock(mutex)
        if gate.close(lost: lost) { count = 0 }
        pthread_mutex_unlock(mutex)
    }

    /// No request goes out again (postcopy is halted).
    func shut() {
        pthread_mutex_lock(mutex)
        gate.shut()
        count = 0
        pthread_mutex_unlock(mutex)
    }

    /// Ends the sending thread; nothing is sent after it returns.
    func stop() {
        pthread_mutex_lock(mutex)
        stopping = true
        gate.shut()
        let running = thread
        thread = nil
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
        running?.join()
    }

    private func run() {
        var batch = [PageRun](repeating: PageRun(first: 0, count: 1), count: Self.capacity)
        while true {
            pthread_mutex_lock(mutex)
            while !stopping && (stream == nil || (count == 0 && !overflowed)) {
                pthread_cond_wait(condition, mutex)
            }
            if stopping {
                pthread_mutex_unlock(mutex)
                return
            }
            let target = stream!
            let resend = overflowed
            let taken = count
            for index in 0..<taken { batch[index] = ring[(head + index) % ring.count] }
            head = (head + taken) % ring.count
            count = 0
            overflowed = false
            pthread_mutex_unlock(mutex)
            // After an overflow (or a rejoin) the tracker's list holds
            // every page still asked for, the queued ones among them.
            if resend {
                send(outstanding()[...], to: target)
            } else {
                send(batch[..<taken], to: target)
            }
        }
    }

    /// Encodes `runs` as PAGE_REQUESTs into the kept buffer and writes them
    /// with one send. A failed send shuts the stream down: its receiving
    /// thread reports the loss, and the rejoin asks again.
    private func send(_ runs: ArraySlice<PageRun>, to target: MessageStream) {
        frames.removeAll(keepingCapacity: true)
        for run in runs {
            var (first, left) = (run.first, run.count)
            while left > 0 {
                let pages = min(left, Self.maxPagesPerRequest)
                let id = nextRequestID.add(1, ordering: .relaxed).newValue
                Message.pageRequest(requestID: id, firstPage: first, count: UInt32(pages)).encode(into: &frames)
                (first, left) = (first + pages, left - pages)
            }
        }
        guard !frames.isEmpty else { return }
        do {
            try target.sendFrame(frames)
        } catch {
            target.shutdown()
        }
    }
}
