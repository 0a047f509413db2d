# frozen_string_literal: true

# Jobs for memwarden's Sidekiq test (tests/test_sidekiq.py), loaded with `sidekiq -r`.
#
# KeepJob keeps `mb` MB for good, in 1 MB strings (each its own mmap), one every `pause`
# seconds: the bloat of the seed's Sidekiq workers. When it has run to its end it counts
# itself in the Redis hash MW_DONE (field: its number), so a test counts the jobs that
# completed, and those that ran twice. Redis is REDIS_URL, as Sidekiq reads it. memwarden's
# middleware is installed, as docs/sidekiq.md asks (it does nothing outside `memwarden run`).
require "sidekiq"
require_relative "../../../src/memwarden/integrations/sidekiq"

Sidekiq.configure_server { |config| Memwarden.install(config) }

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

# GrowJob grows 256 MB a second without end, in 8 MB strings: a poison job.
class GrowJob
  include Sidekiq::Worker

  def perform
    held = []
    loop do
      held << ("p" * 8_000_000)
      sleep 1.0 / 32
    end
  end
end
