#!/usr/bin/perl
# Independent DKIM verifier for the Transformer tests: Perl Mail::DKIM (Debian libmail-dkim-perl).
#
#   verify_dkim.pl RECORDS_FILE < message
#
# RECORDS_FILE holds one "<name> <TXT value>" per line (e.g. "mailer._domainkey.example.test
# v=DKIM1; k=rsa; p=..."); DNS lookups are answered from it, nothing leaves the machine.
# Prints one line per signature: "<algorithm> <d=> <s=> <result detail>", then "result <overall>".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;

my %records;
open( my $fh, '<', $ARGV[0] ) or die "cannot read $ARGV[0]: $!";
while ( my $line = <$fh> ) {
    chomp $line;
    next unless $line;
    my ( $name, $value ) = split( / /, $line, 2 );
    $name =~ s/\.$//;
    $records{ lc $name } = $value;
}
close $fh;

{
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ( $domain, $type ) = @_;
        $domain =~ s/\.$//;
        my $value = $records{ lc $domain };
        if ( !defined $value || uc $type ne 'TXT' ) {
            $@ = 'NXDOMAIN';
            return;
        }
        my @strings = ( $value =~ /(.{1,255})/g );
        my $rr = Net::DNS::RR->new( name => $domain, type => 'TXT', txtdata => [@strings] );
        $@ = 'NOERROR';
        return ($rr);
    };
}

my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while ( my $line = <STDIN> ) {
    $line =~ s/\015?\012\z/\015\012/;    # Mail::DKIM reads CRLF lines
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ( $dkim->signatures ) {
    printf "%s %s %s %s\n", $sig->algorithm, $sig->domain, $sig->selector, $sig->result_detail;
}
print "result ", $dkim->result_detail, "\n";
