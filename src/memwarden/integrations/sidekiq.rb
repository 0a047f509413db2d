# frozen_string_literal: true

# memwarden for Sidekiq run under `memwarden run` (docs/sidekiq.md). A server middleware tells
# run where each job starts and ends (the job protocol of memwarden.command): run journals one
# record per job for `memwarden diagnose`, names the jobs in hand at a hard kill, and
# quarantines a job that was in flight at MEMWARDEN_POISON_KILLS kills; a quarantined job is
# not run again but goes to Sidekiq's Dead set (retry it from the Web UI once it is fixed).
# Sidekiq's basic fetch loses the jobs in hand of a killed process: the middleware keeps a copy
# of each job in hand in run's private spool directory (MEMWARDEN_SPOOL) until it ends, and at
# start puts back on its queue what a killed predecessor left there. Outside `memwarden run` it
# does nothing. It never fails a job.
#
#   require_relative "memwarden_sidekiq"   # this file, copied into your app
#   Sidekiq.configure_server { |config| Memwarden.install(config) }
require "etc"
require "set"
require "sidekiq"

module Memwarden
  # Add the middleware, and the start-up step that puts back a killed predecessor's jobs.
  def self.install(config)
    config.server_middleware { |chain| chain.add RunMiddleware }
    config.on(:startup) { RunMiddleware.requeue_spooled }
  end

  class RunMiddleware
    MAX_LINE = 4096

    # Each job a killed predecessor had in hand goes back to the end of its queue that
    # Sidekiq fetches from next, as Sidekiq's own shutdown puts back unfinished jobs.
    def self.requeue_spooled
      dir = ENV["MEMWARDEN_SPOOL"]
      return if dir.nil? || dir.empty? || !File.directory?(dir)

      Dir.glob(File.join(dir, "*.json")).sort.each do |path|
        payload = File.read(path)
        queue = Sidekiq.load_json(payload)["queue"] || "default"
        Sidekiq.redis { |c| c.rpush("queue:#{queue}", payload) }
        File.delete(path)
        Sidekiq.logger.warn("memwarden: put back job #{File.basename(path, '.json')}: its worker was killed")
      rescue StandardError => e
        Sidekiq.logger.error("memwarden: could not put back #{path}: #{e.class}")
      end
    end

    def call(_worker, job, _queue)
      id = word(job["jid"])
      kind = word(job["wrapped"] || job["class"])
      if quarantined?(id)
        tell("skip #{Process.pid} #{id} #{kind}")
        bury(job)
        return
      end
      spooled = spool(id, job)
      tell("start #{Process.pid} #{id} #{kind} #{rss}")
      begin
        yield
      ensure
        tell("end #{Process.pid} #{id} #{rss}")
        File.delete(spooled) if spooled && File.exist?(spooled)
      end
    end

    private

    def word(value)
      text = value.to_s.split.join("_")
      text.empty? ? "-" : text
    end

    # Sidekiq makes a middleware instance per job: the FIFO is opened once per process.
    @lock = Mutex.new

    def self.fifo
      path = ENV["MEMWARDEN_JOBS"]
      return nil if path.nil? || path.empty?

      @lock.synchronize do
        @fifo = nil if @fifo_pid != Process.pid
        @fifo_pid = Process.pid
        @fifo ||= File.open(path, File::WRONLY | File::NONBLOCK)
      end
    end

    # One line, written whole (under PIPE_BUF) or not at all; never blocks, never raises.
    def tell(line)
      self.class.fifo&.syswrite("#{line[0, MAX_LINE - 1]}\n")
    rescue SystemCallError, IOError
      nil
    end

    # This process's RSS in bytes (measured at the job's boundary; empty where unreadable).
    def rss
      File.read("/proc/self/statm").split[1].to_i * Etc.sysconf(Etc::SC_PAGESIZE)
    rescue SystemCallError, IOError
      ""
    end

    # A copy of the job in hand, written whole (a rename) before it runs; nil: no spool.
    def spool(id, job)
      dir = ENV["MEMWARDEN_SPOOL"]
      return nil if dir.nil? || dir.empty? || id.include?("/")

      path = File.join(dir, "#{id}.json")
      File.write("#{path}.tmp", Sidekiq.dump_json(job), perm: 0o600)
      File.rename("#{path}.tmp", path)
      path
    rescue SystemCallError, IOError
      nil
    end

    def quarantined?(id)
      path = ENV["MEMWARDEN_QUARANTINE"]
      return false if path.nil? || path.empty?

      stat = File.stat(path)
      version = [stat.ino, stat.mtime.to_r]
      if version != @quarantine_version
        @quarantine = File.read(path).split.to_set
        @quarantine_version = version
      end
      @quarantine.include?(id)
    rescue SystemCallError, IOError
      false
    end

    def bury(job)
      Sidekiq::DeadSet.new.kill(Sidekiq.dump_json(job))
    rescue StandardError => e
      Sidekiq.logger.error("memwarden: could not move quarantined job #{job['jid']} to the Dead set: #{e.class}")
    end
  end
end
