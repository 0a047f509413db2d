# frozen_string_literal: true

# A Sidekiq::Middleware::MemoryKiller of the common kind, written from its description: after every
# job, the RSS of the process by shelling out to `ps`; over SIDEKIQ_MEMORY_KILLER_MAX_RSS
# (KB; 0 = off), once (a mutex, "otherwise we'd get stuck restarting over and over"), after
# SIDEKIQ_MEMORY_KILLER_GRACE_TIME_IN_SECONDS (120), the restart.
#
# On Heroku the restart was a Platform API dyno restart: the dyno manager sends SIGTERM to
# the dyno's processes and SIGKILL 30 s later, then starts the dyno again. Here the request
# is a file (MEMORY_KILLER_RESTART_FILE) that bench/sidekiq.py, as the dyno manager, acts on.
module Sidekiq
  module Middleware
    class MemoryKiller
      MAX_RSS = ENV.fetch("SIDEKIQ_MEMORY_KILLER_MAX_RSS", "0").to_i
      GRACE_TIME = ENV.fetch("SIDEKIQ_MEMORY_KILLER_GRACE_TIME_IN_SECONDS", "120").to_i
      RESTART_FILE = ENV.fetch("MEMORY_KILLER_RESTART_FILE", "restart-requested")
      MUTEX = Mutex.new

      def call(_worker, _job, _queue)
        yield
        check_rss
      end

      private

      def check_rss
        return if MAX_RSS <= 0

        rss = `ps -o rss= -p #{::Process.pid}`.to_i
        return if rss <= MAX_RSS
        return unless MUTEX.try_lock # only once

        Sidekiq.logger.warn("MemoryKiller: RSS #{rss} KB over #{MAX_RSS} KB, restart in #{GRACE_TIME}s")
        Thread.new do
          sleep(GRACE_TIME)
          restart
        end
      end

      def restart
        Sidekiq.logger.warn("MemoryKiller: restarting the dyno")
        File.write(RESTART_FILE, ::Process.pid.to_s)
      end
    end
  end
end
