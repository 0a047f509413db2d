# frozen_string_literal: true

# The Sidekiq job of bench/field.py's sidekiq-run cells, loaded with `sidekiq -r`: the
# workloads of bench/apps/field_jobs.py, in Ruby. FieldJob#perform(job_id, kind, mb, secs)
# adds one to the Redis hash "#{FIELD_PREFIX}:runs" (field: the bench's job id) before it
# works and one to "#{FIELD_PREFIX}:done" when it is done. Memory is really allocated (every
# byte written) and kept in KEPT for good where the kind leaks. Redis is REDIS_URL.
require "sidekiq"
# memwarden's middleware: `memwarden run` learns the jobs in hand (poison quarantine, per-job
# records), as the README's Sidekiq section asks.
require_relative "../../src/memwarden/integrations/sidekiq"

Sidekiq.configure_server { |config| Memwarden.install(config) }

Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

KEPT = []
FIELD_PREFIX = ENV.fetch("FIELD_PREFIX", "mw-field")
CAP_MB = ENV.fetch("FIELD_CAP_MB", "4096").to_i
MIB = 1024 * 1024

class FieldJob
  include Sidekiq::Worker

  def perform(job_id, kind, mb = 0, secs = 0)
    attempt = Sidekiq.redis { |c| c.hincrby("#{FIELD_PREFIX}:runs", job_id, 1) }
    work(kind, mb.to_f, secs.to_f, attempt)
    Sidekiq.redis { |c| c.hincrby("#{FIELD_PREFIX}:done", job_id, 1) }
  end

  private

  def work(kind, mb, secs, attempt)
    case kind
    when "leak" then keep(mb, secs, 64 * 1024)
    when "bigleak" then keep(mb, secs, 256 * 1024)
    when "fragment" then fragment(mb, secs)
    when "spike" then spike(mb, secs)
    when "poison" then grow(mb)
    when "runaway" then attempt == 1 ? grow(mb) : sleep(secs)
    else sleep(secs)
    end
  end

  # Keep `mb` MiB in `chunk`-byte strings, in about 20 steps a second.
  def keep(mb, secs, chunk)
    steps = [1, (secs / 0.05).round].max
    owed = 0.0
    steps.times do
      owed += mb * MIB / steps
      while owed >= chunk
        KEPT << ("\x02" * chunk)
        owed -= chunk
      end
      sleep(secs / steps)
    end
    KEPT << ("\x02" * chunk) if owed >= chunk / 2 # what rounding left, to the nearest piece
  end

  # Two threads allocate `mb` MiB of 1-64 KiB strings and keep one in 20.
  def fragment(mb, secs)
    kept = Queue.new
    threads = Array.new(2) do |i|
      Thread.new do
        rnd = Random.new(Random.new_seed + i)
        used = 0
        live = []
        while used < mb * MIB / 2
          size = rnd.rand(1024..(64 * 1024))
          buf = "\x01" * size
          used += size
          rnd.rand(20).zero? ? kept << buf : live << buf
        end
      end
    end
    threads.each(&:join)
    KEPT << kept.pop until kept.empty?
    sleep(secs)
  end

  # Grow the worker's cgroup to `to_mb` MiB (8 MiB at least) in 8 MiB steps over half of
  # `secs`, hold, let go.
  def spike(to_mb, secs)
    mb = [8.0, to_mb - working_set_mb].max
    steps = [1, (mb / 8).to_i].max
    held = []
    steps.times do
      held << ("\x03" * (mb * MIB / steps).to_i)
      sleep(secs / 2 / steps)
    end
    sleep(secs / 2)
    held.clear
  end

  # This process's memory cgroup's usage less its inactive file pages (as memwarden reads
  # it), in MiB; 0 where it cannot be read.
  def working_set_mb
    v1 = File.readlines("/proc/self/cgroup").find { |l| l.split(":")[1].to_s.split(",").include?("memory") }
    dir, usage, inactive = if v1
      ["/sys/fs/cgroup/memory#{v1.chomp.split(":", 3)[2]}", "memory.usage_in_bytes", "total_inactive_file"]
    else
      ["/sys/fs/cgroup#{File.read("/proc/self/cgroup")[/^0::(.*)$/, 1]}", "memory.current", "inactive_file"]
    end
    stat = File.read("#{dir}/memory.stat")[/^#{inactive} (\d+)$/, 1].to_i
    (File.read("#{dir}/#{usage}").to_i - stat) / MIB.to_f
  rescue SystemCallError
    0.0
  end

  # Grow `rate` MiB a second in 8 MiB steps up to CAP_MB, hold a minute, let go.
  def grow(rate)
    held = []
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    (1..(CAP_MB / 8)).each do |k|
      held << ("\x06" * (8 * MIB))
      due = t0 + k * 8 / rate
      wait = due - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      sleep(wait) if wait.positive?
    end
    sleep(60)
    held.clear
  end
end
