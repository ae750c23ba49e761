# TEST ONLY: agenix rules of the VM test's secrets, all encrypted to test-host.agekey.
# Written by generate.sh.
let
  testHost = "age14cenuppjykvha8dtmlawnfj66hsn0h6pn867c2cvky6ljtakju7szr92v0";
in
{
  "admin-password.age".publicKeys = [ testHost ];
  "cluster-key.age".publicKeys = [ testHost ];
  "db-password.age".publicKeys = [ testHost ];
  "db-replication-password.age".publicKeys = [ testHost ];
  "db-superuser-password.age".publicKeys = [ testHost ];
  "grafana-admin-password.age".publicKeys = [ testHost ];
  "grafana-secret-key.age".publicKeys = [ testHost ];
  "metrics-token.age".publicKeys = [ testHost ];
  "stream-key-backstage.age".publicKeys = [ testHost ];
  "stream-key-test.age".publicKeys = [ testHost ];
  "token-key.age".publicKeys = [ testHost ];
}
