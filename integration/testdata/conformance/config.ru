# The conformance suite's Rack app (unicorn, puma): the endpoints of app.py.
# It needs nothing but Ruby: puma runs it without the rack library.
FILL = ("0123456789abcdef" * 4096).freeze
GATE_POLL = 0.01
GATE_MAX = 120.0

def now
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

def mark(dir, id, pid)
  tmp = File.join(dir, "#{id}.tmp")
  File.write(tmp, "#{pid}\n")
  File.rename(tmp, File.join(dir, "#{id}.pid"))
end

# sleep_until keeps the full time, should a signal cut sleep short.
def sleep_until(deadline)
  loop do
    left = deadline - now
    break if left <= 0
    sleep(left)
  end
end

def slow(env)
  q = env["QUERY_STRING"].to_s.split("&").to_h { |kv| kv.split("=", 2) }
  id, ms = q["id"].to_s, q["ms"].to_s
  return nil unless id.match?(/\A\d+\z/) && ms.match?(/\A\d+\z/)
  dir = ENV.fetch("CONFORMANCE_DIR")
  mark(dir, id, Process.pid)
  give_up = now + GATE_MAX
  sleep(GATE_POLL) until File.exist?(File.join(dir, "#{id}.go")) || now >= give_up
  sleep_until(now + ms.to_i / 1000.0)
  FILL + "id=#{id} pid=#{Process.pid} gen=#{ENV.fetch('RELAY_GENERATION', '0')}\n"
end

run(lambda do |env|
  pid = Process.pid
  body =
    case env["PATH_INFO"]
    when "/healthz" then "ok\n"
    when "/slow" then slow(env)
    else "#{pid}\n"
    end
  return [400, { "Content-Type" => "text/plain" }, ["want id and ms, numbers\n"]] if body.nil?
  [200, { "Content-Type" => "text/plain", "Content-Length" => body.bytesize.to_s, "X-Pid" => pid.to_s }, [body]]
end)
