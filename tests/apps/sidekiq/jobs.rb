# frozen_string_literal: true

# Jobs for memwarden's Sidekiq test (tests/test_sidekiq.py), loaded with `sidekiq -r`: the
# bench's KeepJob (bench/apps/sidekiq/jobs.rb: keeps `mb` MB for good, then counts itself in
# the Redis hash MW_DONE, so a test counts the jobs that completed, and those that ran
# twice), and GrowJob, a poison job. Redis is REDIS_URL, as Sidekiq reads it. memwarden's
# middleware is installed, as docs/sidekiq.md asks (it does nothing outside `memwarden run`).
require "sidekiq"
require_relative "../../../src/memwarden/integrations/sidekiq"
require_relative "../../../bench/apps/sidekiq/jobs"

Sidekiq.configure_server { |config| Memwarden.install(config) }

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
