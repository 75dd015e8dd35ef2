#!/usr/bin/perl
# Time Sisimai (Debian libsisimai-perl) on the message files named on stdin,
# one path a line: every file is read into memory first, then parsed from
# memory --reps times. Prints one JSON line: messages, results, cpu and wall
# seconds of the best repetition. Used by bench/bounce_bench.py.
use strict;
use warnings;
use Sisimai;
use Time::HiRes qw(time);

my $reps = shift // 3;
my @messages;
while (my $path = <STDIN>) {
    chomp $path;
    open(my $fh, '<:raw', $path) or die "$path: $!";
    local $/;
    push @messages, scalar <$fh>;
    close $fh;
}
# One untimed pass: Sisimai loads its modules on first use.
for my $text (@messages) { my $copy = $text; Sisimai->make(\$copy); }
my ($best_cpu, $best_wall, $results) = (1e9, 1e9, 0);
for my $rep (1 .. $reps) {
    my $count = 0;
    my ($u0, $s0) = times;
    my $t0 = time;
    for my $text (@messages) {
        my $copy = $text;
        my $list = Sisimai->make(\$copy);
        $count += scalar @$list if $list;
    }
    my $wall = time - $t0;
    my ($u1, $s1) = times;
    my $cpu = ($u1 - $u0) + ($s1 - $s0);
    $best_cpu = $cpu if $cpu < $best_cpu;
    $best_wall = $wall if $wall < $best_wall;
    $results = $count;
}
printf "{\"tool\": \"sisimai %s\", \"messages\": %d, \"results\": %d, \"cpu\": %.6f, \"wall\": %.6f}\n",
    $Sisimai::VERSION, scalar @messages, $results, $best_cpu, $best_wall;
