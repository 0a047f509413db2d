# frozen_string_literal: true

# Jobs for bench/sidekiq.py, loaded with `sidekiq -r` (tests/apps/sidekiq/jobs.rb loads them
# too): KeepJob keeps `mb` MB for good, in 1 MB strings (each its own mmap), one every `pause`
# seconds, then counts itself in the Redis hash MW_DONE (field: its number). With
# SIDEKIQ_MEMORY_KILLER_MAX_RSS set, the ps-after-each-job MemoryKiller middleware
# (memory_killer.rb) guards the process.
require "sidekiq"

Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

KEPT = []
MW_DONE = ENV.fetch("MW_DONE", "mw:sidekiq:done")

class KeepJob
  include Sidekiq::Worker

  def perform(number, mb = 8, pause = 0.05)
    mb.times do
      KEPT << ("x" * 1_000_000)
      sleep pause
    end
    Sidekiq.redis { |conn| conn.hincrby(MW_DONE, number.to_s, 1) }
  end
end

if ENV.fetch("SIDEKIQ_MEMORY_KILLER_MAX_RSS", "0").to_i.positive?
  require_relative "memory_killer"
  Sidekiq.configure_server do |config|
    config.server_middleware do |chain|
      chain.add Sidekiq::Middleware::MemoryKiller
    end
  end
end
