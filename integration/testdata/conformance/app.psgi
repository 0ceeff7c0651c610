# The conformance suite's PSGI app (starman): the endpoints of app.py.
use strict;
use warnings;
use Time::HiRes qw(clock_gettime sleep CLOCK_MONOTONIC);

my $fill      = "0123456789abcdef" x 4096;
my $gate_poll = 0.01;
my $gate_max  = 120;

sub now { clock_gettime(CLOCK_MONOTONIC) }

sub mark {
    my ($dir, $id, $pid) = @_;
    open(my $f, '>', "$dir/$id.tmp") or die "$dir/$id.tmp: $!\n";
    print $f "$pid\n";
    close($f) or die "$dir/$id.tmp: $!\n";
    rename("$dir/$id.tmp", "$dir/$id.pid") or die "$dir/$id.pid: $!\n";
}

# sleep_until keeps the full time: a signal cuts Time::HiRes::sleep short.
sub sleep_until {
    my ($deadline) = @_;
    while ((my $left = $deadline - now()) > 0) {
        sleep($left);
    }
}

sub slow {
    my ($env) = @_;
    my %q = map { split /=/, $_, 2 } split /&/, ($env->{QUERY_STRING} // '');
    my $id = $q{id} // '';
    my $ms = $q{ms} // '';
    return undef if $id !~ /^\d+$/ || $ms !~ /^\d+$/;
    my $dir = $ENV{CONFORMANCE_DIR} or die "no CONFORMANCE_DIR\n";
    mark($dir, $id, $$);
    my $give_up = now() + $gate_max;
    while (!-e "$dir/$id.go" && now() < $give_up) {
        sleep($gate_poll);
    }
    sleep_until(now() + $ms / 1000);
    my $gen = $ENV{RELAY_GENERATION} // '0';
    return $fill . "id=$id pid=$$ gen=$gen\n";
}

sub {
    my $env  = shift;
    my $path = $env->{PATH_INFO} // '/';
    my $body;
    if ($path eq '/healthz') {
        $body = "ok\n";
    } elsif ($path eq '/slow') {
        $body = slow($env);
        return [400, ['Content-Type' => 'text/plain'], ["want id and ms, numbers\n"]] unless defined $body;
    } else {
        $body = "$$\n";
    }
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length($body), 'X-Pid' => $$], [$body]];
};
